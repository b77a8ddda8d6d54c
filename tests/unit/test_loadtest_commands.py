"""`realizar loadtest` end to end against the built-in no-op server: exit codes,
JSON and HTML outputs, the llm and calibrate subcommands, the parser hook."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from realizar.cli import build_parser
from realizar.loadtest.calibrate import noop_server
from realizar.loadtest.cli import main, run
from realizar.loadtest.report import read_json, validate_report


@pytest.fixture(scope="module")
def noop_url() -> Iterator[str]:
    with noop_server() as url:
        yield url


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.serial  # a valid run: the load client's own health is checked, so it runs alone (make test)
def test_suite_passes_and_writes_reports(noop_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    code = main(["--url", noop_url, "--scale", "0.05", "--scenario", "health", "--scenario", "tokenize",
                 "--json", str(out_json), "--html", str(out_html), "--no-progress"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "=== Health Endpoint Load Test ===" in stdout and "=== Tokenize Endpoint Load Test ===" in stdout
    assert "Overall: PASS" in stdout
    doc = read_json(out_json)
    assert validate_report(doc) == [] and doc["exit_code"] == 0
    assert list(doc["scenarios"]) == ["health", "tokenize"]
    assert "data:image/png;base64," in out_html.read_text()


def test_unreachable_server_is_an_invalid_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["--url", _dead_url(), "--scenario", "health", "--json", str(out)]) == 3
    assert "no server answers" in capsys.readouterr().err
    doc = read_json(out)
    assert doc["valid"] is False and doc["exit_code"] == 3


def test_failed_target_exits_1(noop_url: str, tmp_path: Path) -> None:
    targets = tmp_path / "t.json"
    targets.write_text(json.dumps({"scenarios": {"health": {"throughput_rps": 1e9}}}))
    assert main(["--url", noop_url, "--scale", "0.05", "--scenario", "health", "--targets", str(targets)]) == 1


def test_regression_against_baseline_exits_2(noop_url: str, tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    assert main(["--url", noop_url, "--scenario", "health", "--requests", "200", "--json", str(base)]) == 0
    doc = read_json(base)
    # pretend the baseline was ten times faster
    for block in doc["scenarios"]["health"]["blocks"]:
        for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"):
            block[key] /= 10.0
    for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"):
        doc["scenarios"]["health"]["summary"]["latency"][key] /= 10.0
    base.write_text(json.dumps(doc))
    new = tmp_path / "new.json"
    assert main(["--url", noop_url, "--scenario", "health", "--requests", "200", "--baseline", str(base),
                 "--json", str(new)]) == 2
    assert read_json(new)["comparison"]["regressed"] is True


@pytest.mark.parametrize("argv", [["--scenario", "nope"], ["--scale", "0"], ["--bogus"],
                                  ["--targets", "/nonexistent.json"], ["--arrival", "poisson"],
                                  ["llm", "--url", "http://127.0.0.1:1"], ["compare", "a.json"]])
def test_usage_errors_exit_4(argv: list[str]) -> None:
    assert main(argv) == 4


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "exit codes" in capsys.readouterr().out


def test_llm_fixed_rate_uses_vllm_keys(noop_url: str, tmp_path: Path) -> None:
    out = tmp_path / "llm.json"
    code = main(["llm", "--url", noop_url, "--rate", "200", "--num-prompts", "20", "--input-len", "8",
                 "--output-len", "6", "--goodput", "ttft:1000", "--json", str(out)])
    assert code == 0
    doc = read_json(out)
    assert validate_report(doc) == []
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "median_e2el_ms",
                "request_throughput", "output_throughput", "request_goodput", "total_output_tokens"):
        assert key in doc, key
    assert doc["completed"] == 20 and doc["total_output_tokens"] == 120 and doc["model"] == "noop"


def test_llm_concurrency_chat(noop_url: str) -> None:
    assert main(["llm", "--url", noop_url, "--endpoint", "chat", "--concurrency", "4", "--num-prompts", "8",
                 "--output-len", "4"]) == 0


def test_llm_sweep_reports_the_best_rate(noop_url: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    code = main(["llm", "--url", noop_url, "--sweep", "--goodput", "e2el:5000", "--sweep-start", "40",
                 "--sweep-max", "100", "--num-prompts", "10", "--output-len", "4", "--json", str(out)])
    assert code == 0
    sweep = read_json(out)["sweep"]
    assert [s["rate"] for s in sweep["steps"]] == [40.0, 80.0]
    assert sweep["max_rate_meeting_slo"] == 80.0


def test_llm_jsonl_dataset(noop_url: str, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hello there", "max_tokens": 3}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["llm", "--url", noop_url, "--concurrency", "2", "--dataset", str(data), "--output-len", "2"]) == 0
    data.write_text("not json\n")
    assert main(["llm", "--url", noop_url, "--concurrency", "2", "--dataset", str(data)]) == 4


def test_calibrate_reports_both_ceilings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--duration", "0.3", "--client", "raw", "--events", "200", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "req/s" in text and "events/s" in text
    results = read_json(out)["results"]
    assert {r["what"] for r in results} == {"requests", "sse_events"}
    assert all(r["per_second"] > 0 and r["failures"] == 0 for r in results)


def test_the_realizar_parser_hands_everything_to_loadtest(noop_url: str) -> None:
    top = build_parser()
    args = top.parse_args(["loadtest", "--url", noop_url, "--scenario", "health", "--scale", "0.05"])
    assert args.loadtest_argv[0] == "--url"
    assert run(args) == 0
    assert run(top.parse_args(["loadtest", "--scenario", "bogus"])) == 4


def test_loadtest_never_imports_the_engine() -> None:
    """The load tester is an HTTP client: importing all of it pulls in no engine,
    model, server, tokenizer or torch."""
    import subprocess
    import sys

    code = ("import sys, realizar.loadtest, realizar.loadtest.cli, realizar.loadtest.html, "
            "realizar.loadtest.llm, realizar.loadtest.calibrate, realizar.loadtest.compare, "
            "realizar.loadtest.server_process\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(("
            "'realizar.engine', 'realizar.model', 'realizar.server', 'realizar.tokenizer')))\n"
            "print(bad)\nsys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_llm_multi_turn_reports_each_turn(noop_url: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "turns.json"
    assert main(["llm", "--url", noop_url, "--endpoint", "chat", "--workload", "multi-turn", "--concurrency", "2",
                 "--num-prompts", "3", "--turns", "3", "--system-prompt-len", "50", "--input-len", "5",
                 "--output-len", "4", "--json", str(out)]) == 0
    doc = read_json(out)
    assert doc["completed"] == 9 and doc["config"]["workload"] == "multi-turn"
    turns = doc["per_turn"]
    assert [t["group"] for t in turns] == [1, 2, 3] and all(t["requests"] == 3 for t in turns)
    # each turn carries the history: the prompts grow turn by turn
    assert turns[0]["mean_input_tokens"] < turns[1]["mean_input_tokens"] < turns[2]["mean_input_tokens"]
    assert all(t["ttft"]["count"] == 3 for t in turns)
    assert all(t["mean_cached_tokens"] is None for t in turns)  # the no-op server reports none
    assert "Per turn" in capsys.readouterr().out
    assert main(["llm", "--url", noop_url, "--workload", "prefix-shared", "--concurrency", "2",
                 "--num-prompts", "4", "--system-prompt-len", "20", "--output-len", "2"]) == 0
    assert main(["llm", "--url", noop_url, "--workload", "multi-turn", "--concurrency", "2",
                 "--dataset", str(out)]) == 4


def test_llm_json_schema_reports_validity(noop_url: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schema.json"
    assert main(["llm", "--url", noop_url, "--workload", "json-schema", "--concurrency", "2",
                 "--num-prompts", "8", "--output-len", "64", "--json", str(out)]) == 0
    doc = read_json(out)
    assert validate_report(doc) == []
    assert doc["config"]["endpoint"] == "chat" and doc["config"]["ignore_eos"] is False
    v = doc["schema_validity"]
    # the no-op server honours response_format with each schema's smallest instance
    assert v["judged"] == 8 and v["json"] == 8 and v["valid"] == 8 and v["schema_checked"] is True
    assert "Parse and match their schema:" in capsys.readouterr().out
    # response_format is a chat field
    assert main(["llm", "--url", noop_url, "--workload", "json-schema", "--endpoint", "completions",
                 "--concurrency", "2"]) == 4
