"""The load-test toolkit against a real `realizar serve --demo`: all seven
scenarios scaled down, their JSON and HTML reports, and scripts/load_test.sh."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from realizar.loadtest.report import read_json, validate_report
from realizar.loadtest.scenarios import SCENARIO_NAMES
from realizar.loadtest.server_process import free_port

# the suite's load client checks its own health (event-loop lag): it runs alone (make test)
pytestmark = pytest.mark.serial

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "load_test.sh"


@pytest.fixture(scope="module")
def suite_run(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path, Path]:
    out = tmp_path_factory.mktemp("loadtest")
    json_path, html_path = out / "run.json", out / "run.html"
    proc = subprocess.run(
        [sys.executable, "-m", "realizar", "loadtest", "--url", server_url, "--scale", "0.1",
         "--json", str(json_path), "--html", str(html_path), "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr, json_path, html_path


def test_all_seven_scenarios_run_cleanly(suite_run: tuple[int, str, Path, Path]) -> None:
    code, output, json_path, _ = suite_run
    # 0 or 1 only: a valid run whose targets were evaluated (timings are not asserted here)
    assert code in (0, 1), output
    doc = read_json(json_path)
    assert validate_report(doc) == []
    assert doc["exit_code"] == code and doc["valid"] is True
    assert list(doc["scenarios"]) == list(SCENARIO_NAMES)
    for name, sc in doc["scenarios"].items():
        summary = sc["summary"]
        assert summary["total_requests"] > 0, name
        assert summary["failures"] == 0, (name, summary["failures_by_class"])
        assert sc["server_metrics"]["available"] is True, name
    assert doc["scenarios"]["generate"]["summary"]["tokens_per_s"] > 0
    spike = doc["scenarios"]["spike"]
    assert [p["name"] for p in spike["phases"]] == ["baseline", "spike", "recovery"]
    assert spike["recovery_time_s"] is not None
    for header in ("=== Health Endpoint Load Test ===", "=== Spike Load (10x) ===", "=== Performance Targets ==="):
        assert header in output


def test_html_report_has_a_chart_per_scenario(suite_run: tuple[int, str, Path, Path]) -> None:
    _, _, _, html_path = suite_run
    page = html_path.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(SCENARIO_NAMES)
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)


def test_html_report_renders_in_headless_chromium(suite_run: tuple[int, str, Path, Path], tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium on PATH")
    _, _, _, html_path = suite_run
    shot = tmp_path / "shot.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,3000",
                           f"--screenshot={shot}", html_path.as_uri()], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000


def _server_processes(port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "serve" in cmd and str(port) in cmd:
            found.append(proc)
    return found


def test_script_starts_tests_and_stops_the_server(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "report.txt"
    # the Python running the tests runs the script's server and load tester (a worktree has no .venv of its own)
    env = {**os.environ, "SERVER_WAIT": os.environ.get("SERVER_WAIT", "180"), "REALIZAR_PYTHON": sys.executable}
    with out.open("w") as stdout:
        proc = subprocess.run([str(SCRIPT), "--port", str(port), "--", "--scale", "0.1", "--scenario", "health",
                               "--scenario", "spike", "--no-progress"],
                              stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    # stdout is the report only: the server's and the script's chatter went to stderr
    assert report.lstrip().startswith("=== Health Endpoint Load Test ===")
    assert "Server is ready" in proc.stderr and "Server is ready" not in report
    assert _server_processes(port) == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def test_script_without_a_server_exits_1() -> None:
    port = free_port()
    proc = subprocess.run([str(SCRIPT), "--no-server", "--port", str(port)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 1
    assert f"No server found at http://127.0.0.1:{port}" in proc.stderr
    assert proc.stdout == ""


def test_script_help_and_bad_options() -> None:
    ok = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "--no-server" in ok.stdout and "--port" in ok.stdout
    bad = subprocess.run([str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 4 and "Unknown option" in bad.stderr


def test_unreachable_url_is_exit_3(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "realizar", "loadtest", "--url", f"http://127.0.0.1:{free_port()}",
                           "--json", str(out)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 3
    assert json.loads(out.read_text())["valid"] is False
