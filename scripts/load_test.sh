#!/usr/bin/env bash
# Load-test realizar: start `realizar serve --demo`, run the seven scenarios of
# docs/loadtest.md against it, print the report, stop the server.
#
#   ./scripts/load_test.sh                    # start a demo server on 8080 and test it
#   ./scripts/load_test.sh --no-server        # test the server already on the port
#   ./scripts/load_test.sh --port 9000        # another port (server and tests)
#   ./scripts/load_test.sh -- --scale 0.1 --json results/run.json   # options for `realizar loadtest`
#
# stdout carries only the report (stable format: redirect it and diff two runs);
# progress and notices go to stderr. The exit code is `realizar loadtest`'s:
# 0 pass, 1 target failed, 2 regression, 3 invalid run, 4 usage error; and 1
# when the server cannot be started or found.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERVER_PORT=${SERVER_PORT:-8080}
SERVER_WAIT=${SERVER_WAIT:-30}
START_SERVER=true
SERVER_PID=""
SERVER_LOG=""
LOADTEST_ARGS=()

if [[ -t 2 ]]; then
    RED=$'\033[0;31m'; GREEN=$'\033[0;32m'; YELLOW=$'\033[1;33m'; BLUE=$'\033[0;34m'; NC=$'\033[0m'
else
    RED=""; GREEN=""; YELLOW=""; BLUE=""; NC=""
fi

say() {  # say COLOR message...  (to stderr: stdout is the report)
    local color=$1
    shift
    printf '%s%s%s\n' "$color" "$*" "$NC" >&2
}

show_help() {
    cat <<HELP
Load Testing Script for realizar

Usage: $0 [OPTIONS] [-- LOADTEST_OPTIONS]

Options:
    --no-server         Don't start a server; test the one already at the port
    --port PORT         Server port, for the server and the tests (default: \$SERVER_PORT or 8080)
    --wait SECONDS      How long to wait for the server's /health (default: \$SERVER_WAIT or 30)
    --help              Show this help message

Everything after -- goes to \`realizar loadtest\`, e.g. -- --scale 0.1 --json out.json --html out.html

Environment Variables:
    SERVER_PORT         Port to run the server on (default: 8080)
    SERVER_WAIT         Seconds to wait for the server to become healthy (default: 30)
    REALIZAR            The realizar command (default: .venv/bin/realizar, else realizar on PATH)
    REALIZAR_PYTHON     The Python that runs the load tester, and the server when REALIZAR is not set
                        (default: .venv/bin/python, else python3)

Examples:
    ./scripts/load_test.sh
    ./scripts/load_test.sh --no-server
    ./scripts/load_test.sh --port 9000
    ./scripts/load_test.sh > results/v0.2.0.txt && diff results/v0.1.0.txt results/v0.2.0.txt
HELP
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --no-server) START_SERVER=false; shift ;;
        --port)
            [[ $# -ge 2 ]] || { say "$RED" "--port needs a value"; exit 4; }
            SERVER_PORT=$2; shift 2 ;;
        --port=*) SERVER_PORT=${1#--port=}; shift ;;
        --wait)
            [[ $# -ge 2 ]] || { say "$RED" "--wait needs a value"; exit 4; }
            SERVER_WAIT=$2; shift 2 ;;
        --wait=*) SERVER_WAIT=${1#--wait=}; shift ;;
        -h|--help) show_help; exit 0 ;;
        --) shift; LOADTEST_ARGS=("$@"); break ;;
        *) say "$RED" "Unknown option: $1"; show_help >&2; exit 4 ;;
    esac
done

if ! is_uint "$SERVER_PORT" || (( SERVER_PORT < 1 || SERVER_PORT > 65535 )); then
    say "$RED" "Invalid port: $SERVER_PORT"; exit 4
fi
is_uint "$SERVER_WAIT" || { say "$RED" "Invalid wait: $SERVER_WAIT (whole seconds)"; exit 4; }
SERVER_URL="http://127.0.0.1:${SERVER_PORT}"

if [[ -n "${REALIZAR_PYTHON:-}" ]]; then PYTHON=$REALIZAR_PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"
else PYTHON=$(command -v python3 || command -v python); fi
if [[ -n "${REALIZAR:-}" ]]; then
    read -r -a REALIZAR_CMD <<<"$REALIZAR"
elif [[ -n "${REALIZAR_PYTHON:-}" ]]; then
    REALIZAR_CMD=("$PYTHON" -m realizar)
elif [[ -x "$ROOT/.venv/bin/realizar" ]]; then
    REALIZAR_CMD=("$ROOT/.venv/bin/realizar")
elif command -v realizar >/dev/null 2>&1; then
    REALIZAR_CMD=(realizar)
else
    REALIZAR_CMD=("$PYTHON" -m realizar)
fi

check_server() {  # true when GET /health answers 200
    if command -v curl >/dev/null 2>&1; then
        curl -sf -m 2 -o /dev/null "$SERVER_URL/health"
    else
        "$PYTHON" -c 'import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)' "$SERVER_URL"
    fi
}

cleanup() {
    local pid=$SERVER_PID
    SERVER_PID=""
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        say "$YELLOW" "Stopping server (PID: $pid)..."
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do  # up to 20 s to drain
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$RED" "Server did not stop on SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ "$START_SERVER" == true ]]; then
    if check_server; then
        say "$RED" "Something already answers at $SERVER_URL."
        say "$YELLOW" "Test it with --no-server, or pick another port with --port."
        exit 1
    fi
    SERVER_LOG=$(mktemp "${TMPDIR:-/tmp}/realizar-load-test-server.XXXXXX.log")
    say "$BLUE" "Starting realizar server on port $SERVER_PORT (${REALIZAR_CMD[*]} serve --demo; log: $SERVER_LOG)..."
    "${REALIZAR_CMD[@]}" serve --demo --port "$SERVER_PORT" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    say "$BLUE" "Waiting up to ${SERVER_WAIT}s for the server to be ready..."
    deadline=$((SECONDS + SERVER_WAIT))
    until check_server; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            say "$RED" "Server exited before becoming ready. Last lines of its log:"
            tail -n 20 "$SERVER_LOG" >&2 || true
            SERVER_PID=""
            exit 1
        fi
        if (( SECONDS >= deadline )); then
            say "$RED" "Server failed to start within ${SERVER_WAIT} seconds (set SERVER_WAIT or --wait to wait longer)."
            tail -n 20 "$SERVER_LOG" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    say "$GREEN" "Server is ready!"
else
    say "$BLUE" "Checking for existing server at $SERVER_URL..."
    if ! check_server; then
        say "$RED" "No server found at $SERVER_URL"
        say "$YELLOW" "Start one (realizar serve --demo --port $SERVER_PORT) or run without --no-server."
        exit 1
    fi
    say "$GREEN" "Server found at $SERVER_URL"
fi

say "$BLUE" "Running the load tests against $SERVER_URL..."
set +e
"$PYTHON" -m realizar.loadtest --url "$SERVER_URL" ${LOADTEST_ARGS[@]+"${LOADTEST_ARGS[@]}"}
status=$?
set -e
if (( status == 0 )); then
    say "$GREEN" "Load tests complete: all targets met."
else
    say "$YELLOW" "Load tests finished with exit code $status."
fi
exit "$status"
