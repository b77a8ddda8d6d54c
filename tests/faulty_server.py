"""``python -m tests.faulty_server serve ...``: the real ``realizar`` CLI, with its model runner
wrapped so that requests carrying :data:`FAULT_SEED` fail inside the engine step once they have
generated a token. Fault injection lives here, in the tests; the server has no hook for it.

The fault comes after the culprit's first token, so its prefill step succeeds: a culprit alone in
a batch fails one step at most, never the engine's run of consecutive failures.
"""

from __future__ import annotations

from realizar.cli import main
from realizar.engine import engine as engine_module
from realizar.engine.runner import ModelRunner, StepResult
from realizar.engine.scheduler import SchedulerOutput
from realizar.sampling import SamplingRow

FAULT_SEED = 424_242  # a request with this seed fails in the engine


class FaultyRunner(ModelRunner):
    """The real runner, failing any step that holds a culprit with a token generated."""

    def execute(self, output: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepResult:
        if any(item.seq.request.params.seed == FAULT_SEED and item.seq.num_generated >= 1
               for item in (*output.decodes, *output.prefills)):
            raise RuntimeError("fault injected by tests.faulty_server")
        return super().execute(output, rows)


if __name__ == "__main__":
    engine_module.ModelRunner = FaultyRunner  # type: ignore[misc]
    raise SystemExit(main())
