"""realizar's load-testing toolkit: an HTTP client that works against any server.

It never imports the engine, the model or the server; ``realizar loadtest``
and ``scripts/load_test.sh`` drive it. See docs/loadtest.md.
"""

from realizar.loadtest.config import LoadTestConfig
from realizar.loadtest.runner import RunOptions, ScenarioResult, run_scenario, run_sync
from realizar.loadtest.scenarios import SCENARIO_NAMES, Scenario, seed_scenarios
from realizar.loadtest.stats import FailureClass, Summary
from realizar.loadtest.targets import Targets

__all__ = [
    "SCENARIO_NAMES",
    "FailureClass",
    "LoadTestConfig",
    "RunOptions",
    "Scenario",
    "ScenarioResult",
    "Summary",
    "Targets",
    "run_scenario",
    "run_sync",
    "seed_scenarios",
]
