#!/usr/bin/env bash
# On the GPU machine, from the repo root, after `source scripts/device_env.sh`: serve MODEL with
# random weights, load it with the serving benchmark (ShareGPT-like, all requests at once) while
# py-spy samples the server, then print which threads hold the GIL and where.
#   bash scripts/profile_serving.sh [MODEL] [NUM_PROMPTS] [SECONDS]
# Needs py-spy: its wheel in device_wheels/ (carried) or already installed.
set -euo pipefail
MODEL=${1:-gemma2-2b}; PROMPTS=${2:-200}; SECONDS_=${3:-20}; WORKLOAD=${WORKLOAD:-sharegpt}; VOCAB=${VOCAB:-1000}
DEST=${OUT:-/tmp}; PORT=8123
command -v py-spy >/dev/null || python3 -m pip install -q --no-index --find-links device_wheels py-spy \
    || python3 -m pip install -q --no-index --user --find-links device_wheels py-spy
export PATH="$HOME/.local/bin:$PATH"
CK=/tmp/profile-serving/$MODEL
[ -f "$CK/jaxpage_config.json" ] || python3 -m jaxpage.benchmarks.serving --model "$MODEL" --make-checkpoint "$CK"
python3 -m jaxpage.cli serve --checkpoint "$CK" --port $PORT --max-num-seqs 256 \
    > "$DEST/profile-serve-$MODEL.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
python3 - <<PY
import time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen("http://127.0.0.1:$PORT/health", timeout=2); break
    except Exception:
        time.sleep(1)
else:
    raise SystemExit("server did not come up")
PY
py-spy record --pid $SERVER --subprocesses --gil --threads --rate 200 --nonblocking \
    --format raw --duration "$SECONDS_" -o "$DEST/profile-gil-$MODEL.raw" > /dev/null 2>&1 &
SPY=$!
python3 -m jaxpage.benchmarks.serving --url http://127.0.0.1:$PORT --workload "$WORKLOAD" \
    --num-prompts "$PROMPTS" --vocab-size "$VOCAB" --rates inf --json "$DEST/profile-serving-$MODEL.json" 2>&1 | tail -3
wait $SPY || true
echo "GIL-holding samples over ${SECONDS_} s at 200 Hz (all-busy GIL: $((SECONDS_ * 200))):"
python3 scripts/pyspy_summary.py "$DEST/profile-gil-$MODEL.raw" --threads 3 --top 45
