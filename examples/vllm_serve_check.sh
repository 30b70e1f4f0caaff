#!/usr/bin/env bash
# The check to run after installing kvtier next to vLLM: a real `vllm serve` with KVTierConnector answers two
# /v1/completions requests that share a long prefix (temperature 0). The first stores the prompt's KV, the second
# retrieves the shared prefix from kvtier, and both texts equal those of `vllm serve` without the connector.
#
#   examples/vllm_serve_check.sh [MODEL_DIR]        # default: the prepared SmolLM2 (`kvtier model prepare`)
#
# In-process mode by default; export KVTIER_SERVER_URL=tcp://127.0.0.1:5555 (with `kvtier server` running) to
# check server mode. Environment: PYTHON (default .venv/bin/python or python3), PORT (default 8199: the reference
# vLLM's; the one with the connector listens on PORT + 1). Each `vllm serve` start takes ~30 s on a small CPU box;
# the two start at once. Exit status 0 = passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
MODEL=${1:-$("$PYTHON" -c 'from kvtier.integrations.models import model_path; print(model_path())')}
PORT=${PORT:-8199}
WORK=$(mktemp -d)
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
KV_CONFIG='{"kv_connector":"KVTierConnector","kv_connector_module_path":"kvtier.integrations.vllm","kv_role":"kv_both","kv_connector_extra_config":{"chunk_size":128}}'
PIDS=()
trap '[ "${#PIDS[@]}" -gt 0 ] && kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null || true' EXIT

# A 1,000-token shared document, then two different questions (prompt tokens are not multiples of 128).
DOC=$("$PYTHON" -c 'print(" ".join(f"Line {i}: the {w} is stored in box {i * 7 % 13}." for i, w in
      zip(range(120), ["lamp", "key", "map", "coin", "book", "ring"] * 20)))')

serve() {  # serve PORT LOGFILE [vllm args...]: start vllm serve in the background
    local port=$1 log=$2; shift 2
    "$PYTHON" -m vllm.entrypoints.cli.main serve "$MODEL" --port "$port" --enforce-eager --dtype float32 \
        --max-model-len 4096 --no-enable-prefix-caching "$@" >"$log" 2>&1 &
    PIDS+=($!)
}

wait_healthy() {  # wait_healthy PORT PID LOGFILE: wait until that vllm serve answers
    local port=$1 pid=$2 log=$3
    for _ in $(seq 400); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { echo "vllm serve exited; log: $log" >&2; tail -20 "$log" >&2; exit 1; }
        sleep 1
    done
    echo "vllm serve did not start; log: $log" >&2; exit 1
}

complete() {  # complete PORT QUESTION: the completion text (greedy, 24 tokens)
    local body
    body=$("$PYTHON" -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "prompt": sys.argv[2] +
        "\nQuestion: " + sys.argv[3] + "\nAnswer:", "max_tokens": 24, "temperature": 0}))' "$MODEL" "$DOC" "$2")
    curl -sf "http://127.0.0.1:$1/v1/completions" -H 'Content-Type: application/json' -d "$body" |
        "$PYTHON" -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["text"]))'
}

# Both start at once (a start is mostly waiting on one core); the requests then run one at a time.
echo "starting vllm serve without the connector (reference, port $PORT) and with KVTierConnector (port $((PORT + 1)))"
serve "$PORT" "$WORK/plain.log"
serve "$((PORT + 1))" "$WORK/kvtier.log" --kv-transfer-config "$KV_CONFIG"
wait_healthy "$PORT" "${PIDS[0]}" "$WORK/plain.log"
wait_healthy "$((PORT + 1))" "${PIDS[1]}" "$WORK/kvtier.log"

echo "1/2 the reference"
REF1=$(complete "$PORT" "Which box holds the lamp of line 6?"); REF2=$(complete "$PORT" "Which box holds the coin of line 9?")
echo "2/2 with KVTierConnector"
OUT1=$(complete "$((PORT + 1))" "Which box holds the lamp of line 6?")
OUT2=$(complete "$((PORT + 1))" "Which box holds the coin of line 9?")
kill "${PIDS[@]}"; wait "${PIDS[@]}" 2>/dev/null || true; PIDS=()

grep -h "kvtier: request" "$WORK/kvtier.log" || true
fail=0
[ "$OUT1" = "$REF1" ] || { echo "FAIL request 1: $OUT1 != $REF1"; fail=1; }
[ "$OUT2" = "$REF2" ] || { echo "FAIL request 2: $OUT2 != $REF2"; fail=1; }
grep -q "Stored [1-9][0-9]* tokens" "$WORK/kvtier.log" || { echo "FAIL: nothing stored"; fail=1; }
grep -q "Retrieved [1-9][0-9]* of" "$WORK/kvtier.log" || { echo "FAIL: the shared prefix was not retrieved"; fail=1; }
[ "$fail" = 0 ] && echo "PASS: texts equal vLLM without the connector: $OUT1 / $OUT2 (logs in $WORK)"
exit "$fail"
