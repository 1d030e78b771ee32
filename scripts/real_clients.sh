#!/usr/bin/env bash
# The gateway's mock and upstream modes checked with real clients: the
# official `openai` Python package and LiteLLM, and `GET /metrics` read by
# Prometheus's Python parser (scripts/real_clients.py says what is checked).
#
#   bash scripts/real_clients.sh
#
# Builds tollgate-gateway (debug), starts it on a free loopback port with its
# embedded demo config, waits for GET /health, runs the checks, and stops the
# gateway whatever happens; real_clients.py starts the gateways in upstream
# mode (with the same binary) and the vLLM-like backend one of them forwards
# to, and stops them too. The clients live in a Python venv under the cargo
# target dir (TOLLGATE_CLIENTS_VENV to put it elsewhere), installed with pip
# the first time and whenever the pinned versions below change.
#
# Environment: PYTHON (default python3, 3.10 or later, with the venv module;
# Debian: apt-get install python3-venv), TOLLGATE_GATEWAY_BIN (a gateway
# binary to use instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."

# The major versions these checks were verified with.
REQUIREMENTS=("openai>=3,<4" "litellm>=1.110,<2" "prometheus_client>=0.20,<1")

# Nothing reaches the network from LiteLLM: its bundled price list, no
# telemetry, no hub look-ups.
export LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_OFFLINE_MODE=true LITELLM_TELEMETRY=False
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

python=${PYTHON:-python3}
target_dir=$(cargo metadata --format-version 1 --no-deps |
    "$python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
venv=${TOLLGATE_CLIENTS_VENV:-$target_dir/real-clients-venv}

if [[ ! -x $venv/bin/python ]]; then
    echo "real_clients: creating a venv in $venv"
    "$python" -m venv "$venv" || {
        echo "real_clients: '$python -m venv' failed (Debian: apt-get install python3-venv)" >&2
        exit 1
    }
fi
stamp=$venv/.tollgate-requirements
if [[ "$(cat "$stamp" 2>/dev/null)" != "${REQUIREMENTS[*]}" ]]; then
    echo "real_clients: installing ${REQUIREMENTS[*]}"
    "$venv/bin/python" -m pip install --quiet "${REQUIREMENTS[@]}"
    echo "${REQUIREMENTS[*]}" >"$stamp"
fi

if [[ -n ${TOLLGATE_GATEWAY_BIN:-} ]]; then
    bin=$TOLLGATE_GATEWAY_BIN
else
    cargo build --quiet -p tollgate-gateway
    bin=$target_dir/debug/tollgate-gateway
fi

logs=$(mktemp -d)
pid=
stop() {
    if [[ -n $pid ]]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$logs"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Port 0: the system picks a free port, which the gateway prints.
"$bin" --listen 127.0.0.1:0 --drain 5 >"$logs/out" 2>"$logs/err" &
pid=$!

base=
for _ in $(seq 100); do
    base=$(sed -n 's/^tollgate-gateway listening on //p' "$logs/out")
    [[ -n $base ]] && break
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "real_clients: the gateway exited before listening:" >&2
        cat "$logs/err" >&2
        exit 1
    fi
    sleep 0.1
done
[[ -n $base ]] || { echo "real_clients: the gateway did not start in 10 s" >&2; exit 1; }

"$venv/bin/python" - "$base/health" <<'EOF'
import sys, time, urllib.request
for _ in range(100):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as res:
            if res.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"real_clients: GET {sys.argv[1]} did not answer 200")
EOF

status=0
TOLLGATE_BASE=$base TOLLGATE_GATEWAY_BIN=$bin "$venv/bin/python" scripts/real_clients.py || status=$?
if [[ $status -ne 0 ]]; then
    echo "real_clients: the gateway's log:" >&2
    tail -n 50 "$logs/err" >&2
fi
exit "$status"
