"""The benchmark peers' configuration choices (benchmarks/common.py): where the peers
live, and which settings each peer gets for a given CPU. No peer is started here."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture()
def common(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """benchmarks/common.py imported afresh with no peer location overridden."""
    for var in ("REALIZAR_PEERS_DIR", "LLAMA_SERVER_BIN", "VLLM_PYTHON", "VLLM_MODEL_DIR", "LLAMACPP_PYTHON",
                "LLAMA_FLASH_ATTN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("common", None)
    module = importlib.import_module("common")
    yield module
    sys.modules.pop("common", None)


def _cpu(common: ModuleType, flags: set[str], cpus: tuple[int, ...] = (0, 1, 2, 3)) -> object:
    return common.CpuInfo(cpus, cpus, frozenset(flags))


def _hf_dir(tmp_path: Path) -> Path:
    # SmolLM2-135M's shape: 30 layers, 9 query heads and 3 KV heads of 64
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}))
    return tmp_path


def test_peers_dir_defaults_to_the_repository(common: ModuleType) -> None:
    assert common.PEERS_DIR == ROOT / ".peers"
    assert common.LLAMA_SERVER_BIN == ROOT / ".peers/llama.cpp-src/build/bin/llama-server"
    assert common.VLLM_PYTHON == ROOT / ".peers/vllm/bin/python"
    assert common.VLLM_MODEL_DIR == ROOT / ".peers/smollm2-hf"


def test_peers_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REALIZAR_PEERS_DIR", str(tmp_path))
    monkeypatch.setenv("VLLM_MODEL_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("common", None)
    try:
        common = importlib.import_module("common")
        assert tmp_path / "llama.cpp-src/build/bin/llama-server" == common.LLAMA_SERVER_BIN
        assert tmp_path / "elsewhere" == common.VLLM_MODEL_DIR
    finally:
        sys.modules.pop("common", None)


def test_llama_server_config(common: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "cpu_info", lambda: _cpu(common, {"avx2", "avx512f"}))
    config = common.llama_server_config(parallel=16, ctx_per_slot=320)
    args = list(config.args)

    def value(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert value("-t") == value("-tb") == "4"  # one per physical core by default
    assert value("-np") == "16" and value("-c") == str(16 * 320)
    assert "-cb" in args and value("-fa") == common.LLAMA_FLASH_ATTN
    assert config.settings["threads"] == 4 and config.settings["slots"] == 16
    assert "threads 4" in config.note() and "CPU AVX-512+AVX2" in config.note()
    assert "--no-repack" not in args and config.settings["weight repacking"] == "on"


def test_llama_server_runs_without_repacking_where_the_cpu_has_amx(common: ModuleType,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The vendored llama.cpp's AMX kernels (reached through its repacked weights) die of SIGILL on an AMX
    Xeon: there it runs with --no-repack, on its AVX-512 kernels, unless LLAMA_REPACK asks otherwise."""
    monkeypatch.setattr(common, "cpu_info", lambda: _cpu(common, {"avx2", "avx512f", "amx_tile", "amx_int8"}))
    config = common.llama_server_config()
    assert "--no-repack" in config.args and config.settings["weight repacking"] == "off"
    monkeypatch.setattr(common, "LLAMA_REPACK", "on")
    assert "--no-repack" not in common.llama_server_config().args


@pytest.mark.parametrize(("flags", "dtype", "kv_bytes"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16", 2),
    ({"avx2", "amx_bf16"}, "bfloat16", 2),
    ({"avx2", "avx512f"}, "float32", 4),
    ({"avx2"}, "float32", 4),
])
def test_vllm_dtype_follows_native_bf16(common: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        flags: set[str], dtype: str, kv_bytes: int) -> None:
    monkeypatch.setattr(common, "cpu_info", lambda: _cpu(common, flags))
    model = _hf_dir(tmp_path)
    config = common.vllm_config(model_dir=model, max_num_seqs=64, ctx_per_seq=1024, python=tmp_path / "bin/python")
    assert config.args[config.args.index("--dtype") + 1] == dtype
    # 2 (K, V) x 30 layers x 3 KV heads x 64 dims per token, 64 x 1024 tokens, at most a quarter of the RAM
    need = 2 * 30 * 3 * 64 * kv_bytes * 64 * 1024
    cap = int(psutil.virtual_memory().total / 4 / 2**30)
    assert int(config.env["VLLM_CPU_KVCACHE_SPACE"]) == max(1, min(-(-need // 2**30), cap))
    assert config.settings["dtype"] == dtype


def test_vllm_threads_bind_one_cpu_per_core(common: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    # CPUs 0-3 on two cores with two threads each: one of each core is bound
    monkeypatch.setattr(common, "cpu_info", lambda: common.CpuInfo((0, 1, 2, 3), (0, 2), frozenset({"avx2"})))
    model = _hf_dir(tmp_path)
    config = common.vllm_config(model_dir=model, python=tmp_path / "bin/python")
    assert config.env["VLLM_CPU_OMP_THREADS_BIND"] == "0,2"
    assert config.settings["threads"] == 2
    assert common.vllm_config(model_dir=model, threads=1, python=tmp_path / "bin/python").env[
        "VLLM_CPU_OMP_THREADS_BIND"] == "0"
    # more threads than cores: the siblings follow, each CPU once
    assert common.vllm_config(model_dir=model, threads=3, python=tmp_path / "bin/python").env[
        "VLLM_CPU_OMP_THREADS_BIND"] == "0,2,1"
    # an explicit dtype wins over the CPU's
    assert "bfloat16" in common.vllm_config(model_dir=model, dtype="bfloat16", python=tmp_path / "bin/python").args
    # the KV cache is at least 1 GiB and holds one sequence of the full length
    assert int(config.env["VLLM_CPU_KVCACHE_SPACE"]) >= 1


def test_default_threads_counts_physical_cores(common: ModuleType) -> None:
    info = common.cpu_info()
    assert 1 <= common.default_threads() == len(info.physical) <= len(info.cpus)
    assert set(info.physical) <= set(info.cpus)


def test_multi_turn_benchmark_configurations_and_report(common: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """benchmarks/multi_turn.py: realizar with and without prefix caching, vLLM's pair only with
    --peers vllm, each with room for the last turn; the report's ratio is off over on at the last turn."""
    sys.modules.pop("multi_turn", None)
    multi_turn = importlib.import_module("multi_turn")
    try:
        args = multi_turn.build_parser().parse_args([])
        assert (args.system_prompt_len, args.turns, args.conversations, args.concurrency, args.output_len) == \
            (2000, 4, 8, 8, 16)
        configs = multi_turn.configurations(args)
        assert [label for label, _ in configs] == ["realizar, prefix caching", "realizar, --no-prefix-caching"]
        on, off = (spec.argv for _, spec in configs)
        assert "--no-prefix-caching" not in on and "--no-prefix-caching" in off
        ctx = int(on[on.index("--max-model-len") + 1])
        assert ctx >= 2000 + 4 * (32 + 16)

        python = tmp_path / "bin/python"
        python.parent.mkdir()
        python.touch()
        monkeypatch.setattr(common, "VLLM_PYTHON", python)
        monkeypatch.setattr(common, "_dist_version", lambda *_: "test")
        model = _hf_dir(tmp_path)
        monkeypatch.setattr(multi_turn, "vllm_spec", lambda **kw: common.vllm_spec(model_dir=model, **kw))
        args = multi_turn.build_parser().parse_args(["--peers", "vllm"])
        vllm = [spec for label, spec in multi_turn.configurations(args) if label.startswith("vllm")]
        assert len(vllm) == 2 and not any(isinstance(s, str) for s in vllm)
        assert "--enable-prefix-caching" in vllm[0].argv and "--no-enable-prefix-caching" in vllm[1].argv
        assert vllm[0].argv[vllm[0].argv.index("--max-model-len") + 1] == str(ctx)

        def result(config: str, ttfts: list[float]) -> dict[str, object]:
            return {"config": config, "server": "realizar", "note": "", "failed": 0, "turns": [
                {"group": i + 1, "requests": 8, "mean_input_tokens": 2100.0 + 50 * i, "mean_cached_tokens": None,
                 "ttft": {"p50_ms": t}} for i, t in enumerate(ttfts)]}

        results = [result("on", [900.0, 120.0, 100.0, 80.0]), result("off", [900.0, 950.0, 1000.0, 1200.0])]
        assert multi_turn.ratios(results, 4) == [("realizar", 15.0)]
        text = multi_turn.markdown(results, [], multi_turn.build_parser().parse_args([]))
        assert "| 4 | 2250 | n/a | 80.0 | n/a | 1200.0 |" in text and "15.0x (target >= 5x: met)" in text
    finally:
        sys.modules.pop("multi_turn", None)


def test_throughput_rounds_report_each_ratio_by_round_and_its_median(common: ModuleType) -> None:
    """benchmarks/throughput.py --rounds: every realizar/peer ratio by round and its median; a peer that failed a
    level in one round counts as missing there, not as zero; the plot's results are each level's median."""
    sys.modules.pop("throughput", None)
    throughput = importlib.import_module("throughput")
    try:
        args = throughput.build_parser().parse_args(["--peers", "vllm", "--concurrency", "1,64", "--rounds", "3"])
        assert args.rounds == 3
        with pytest.raises(SystemExit):
            throughput.build_parser().parse_args(["--rounds", "0"])

        def result(server: str, tok_s: dict[int, float], failed: int = 0) -> dict[str, object]:
            return {"server": server, "levels": {c: {"output_tok_s": v, "failed": failed if c == 64 else 0,
                                                     "requests": 128} for c, v in tok_s.items()}}

        rounds = [[result("realizar", {1: 160.0, 64: 1100.0}), result("vllm", {1: 40.0, 64: 1000.0})],
                  [result("realizar", {1: 140.0, 64: 760.0}), result("vllm", {1: 35.0, 64: 950.0})],
                  [result("realizar", {1: 150.0, 64: 900.0}), result("vllm", {1: 50.0, 64: 0.0}, failed=128)]]
        text = throughput.ratios_by_round(rounds, args)
        assert "| 1 | 160.0, 140.0, 150.0 | 150.0 | 4.00x, 4.00x, 3.00x | 4.00x |" in text
        assert "| 64 | 1100.0, 760.0, 900.0 | 900.0 | 1.10x, 0.80x, n/a | 0.95x |" in text
        medians = throughput.median_results(rounds, args)
        assert [m["server"] for m in medians] == ["realizar", "vllm"]
        assert medians[0]["levels"][64]["output_tok_s"] == 900.0 and medians[1]["levels"][64]["output_tok_s"] == 975.0
    finally:
        sys.modules.pop("throughput", None)


def test_vllm_preloads_tcmalloc_and_intel_openmp_where_found(common: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    monkeypatch.setattr(common, "cpu_info", lambda: common.CpuInfo((0, 1), (0, 1), frozenset({"avx2"})))
    model = _hf_dir(tmp_path)
    places = (tmp_path / "a/libtcmalloc_minimal.so.4", tmp_path / "b/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(common, "TCMALLOC_PLACES", places)
    python = tmp_path / "venv/bin/python"
    assert common.tcmalloc() is None
    assert "LD_PRELOAD" not in common.vllm_config(model_dir=model, python=python).env
    places[1].parent.mkdir()
    places[1].write_bytes(b"")
    iomp = tmp_path / "venv/lib/libiomp5.so"
    iomp.parent.mkdir(parents=True)
    iomp.write_bytes(b"")
    assert common.tcmalloc() == places[1]
    assert common.vllm_config(model_dir=model, python=python).env["LD_PRELOAD"] == f"{places[1]}:{iomp}"
