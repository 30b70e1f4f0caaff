#!/usr/bin/env bash
# The check to run after installing kvtier next to vLLM: a real `vllm serve` with KVTierConnector answers two
# /v1/completions requests that share a long prefix (temperature 0). The first stores the prompt's KV, the second
# retrieves the shared prefix from kvtier, and both texts equal those the same vLLM computes for the same requests
# from scratch (each sent first under a `cache_salt` of its own: a cache key nothing else shares, so nothing cached
# is reused; the connector's log shows both computed).
#
#   examples/vllm_serve_check.sh [MODEL_DIR]        # default: the prepared SmolLM2 (`kvtier model prepare`)
#
# In-process mode by default; export KVTIER_SERVER_URL=tcp://127.0.0.1:5555 (with `kvtier server` running) to
# check server mode. Environment: PYTHON (default .venv/bin/python or python3), PORT (default 8199). A `vllm serve`
# start takes ~30-60 s on a small CPU box. Exit status 0 = passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
MODEL=${1:-$("$PYTHON" -c 'from kvtier.integrations.models import model_path; print(model_path())')}
PORT=${PORT:-8199}
WORK=$(mktemp -d)
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
KV_CONFIG='{"kv_connector":"KVTierConnector","kv_connector_module_path":"kvtier.integrations.vllm","kv_role":"kv_both","kv_connector_extra_config":{"chunk_size":128}}'
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null || true' EXIT

# A 1,000-token shared document, then two different questions (prompt tokens are not multiples of 128).
DOC=$("$PYTHON" -c 'print(" ".join(f"Line {i}: the {w} is stored in box {i * 7 % 13}." for i, w in
      zip(range(120), ["lamp", "key", "map", "coin", "book", "ring"] * 20)))')

serve() {  # serve LOGFILE [vllm args...]: start vllm serve, wait until it answers
    local log=$1; shift
    "$PYTHON" -m vllm.entrypoints.cli.main serve "$MODEL" --port "$PORT" --enforce-eager --dtype float32 \
        --max-model-len 4096 --no-enable-prefix-caching "$@" >"$log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 400); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "vllm serve exited; log: $log" >&2; tail -20 "$log" >&2; exit 1; }
        sleep 1
    done
    echo "vllm serve did not start; log: $log" >&2; exit 1
}

complete() {  # complete QUESTION [CACHE_SALT]: the completion text (greedy, 24 tokens)
    local body
    body=$("$PYTHON" -c 'import json, sys; body = {"model": sys.argv[1], "prompt": sys.argv[2] + "\nQuestion: " +
        sys.argv[3] + "\nAnswer:", "max_tokens": 24, "temperature": 0}; salt = sys.argv[4:]
print(json.dumps({**body, "cache_salt": salt[0]} if salt else body))' "$MODEL" "$DOC" "$@")
    curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' -d "$body" |
        "$PYTHON" -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["text"]))'
}

Q1="Which box holds the lamp of line 6?"
Q2="Which box holds the coin of line 9?"
echo "starting vllm serve with KVTierConnector"
serve "$WORK/kvtier.log" --kv-transfer-config "$KV_CONFIG"
echo "1/2 the reference: each request computed from scratch (a cache_salt of its own)"
REF1=$(complete "$Q1" "check-$$-1"); REF2=$(complete "$Q2" "check-$$-2")
REFERENCE_LINES=$(grep -c "kvtier: request" "$WORK/kvtier.log" || true)
echo "2/2 the same requests: the first stores its prompt, the second retrieves the shared prefix"
OUT1=$(complete "$Q1"); OUT2=$(complete "$Q2")
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""

grep -h "kvtier: request" "$WORK/kvtier.log" || true
CHECKED=$(grep "kvtier: request" "$WORK/kvtier.log" | tail -n +"$((REFERENCE_LINES + 1))" || true)
fail=0
grep "kvtier: request" "$WORK/kvtier.log" | head -n "$REFERENCE_LINES" | grep -q "Retrieved [1-9]" &&
    { echo "FAIL: a reference request reused cached KV"; fail=1; }
[ "$OUT1" = "$REF1" ] || { echo "FAIL request 1: $OUT1 != $REF1"; fail=1; }
[ "$OUT2" = "$REF2" ] || { echo "FAIL request 2: $OUT2 != $REF2"; fail=1; }
grep -q "Stored [1-9][0-9]* tokens" <<<"$CHECKED" || { echo "FAIL: nothing stored"; fail=1; }
grep -q "Retrieved [1-9][0-9]* of" <<<"$CHECKED" || { echo "FAIL: the shared prefix was not retrieved"; fail=1; }
[ "$fail" = 0 ] && echo "PASS: texts equal those computed from scratch: $OUT1 / $OUT2 (logs in $WORK)"
exit "$fail"
