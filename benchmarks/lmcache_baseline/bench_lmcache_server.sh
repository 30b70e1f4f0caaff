#!/usr/bin/env bash
# Baseline of LMCache 0.5.6's multi-process cache server (`lmcache server`, ZMQ + HTTP) on CPU,
# driven by LMCache's own client `lmcache bench server --mode cpu --transfer-mode lmcache_driven`.
# Usage: benchmarks/lmcache_baseline/bench_lmcache_server.sh [OUT.jsonl]
#   (default benchmarks/results/lmcache_server.jsonl; env: LMCACHE_VENV, REQS=11, LOOKUP_REQS=9, START=1000)
# Output: one JSON line per case ({"case", "cmd", "psi_cpu_avg10_before/after", "other_procs_cpu_cores",
# "result": <the bench's JSON>, "samples": per-request ms and lookup hit chunks parsed from the client log}),
# plus a "meta" line first and an "end" line (server L1 metrics, PSI after the server stopped) last.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${LMCACHE_VENV:-$HOME/.cache/kvtier/lmcache-venv}
OUT=${1:-$ROOT/benchmarks/results/lmcache_server.jsonl}
REQS=${REQS:-11}               # 4096-token sequences; each is one cold STORE and one warm RETRIEVE
LOOKUP_REQS=${LOOKUP_REQS:-9}  # 32768-token sequences with a tiny KV shape (lookup cost only)
START=${START:-1000}           # first sequence id (token 0 of each prompt), so keys are fresh
L1_GB=4
CHUNK=256
export LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1 LMCACHE_DISABLE_BANNER=1

[ -x "$VENV/bin/lmcache" ] || "$ROOT/benchmarks/lmcache_baseline/setup.sh"
LMC="$VENV/bin/lmcache"

TMP=$(mktemp -d)
SERVER_PID=
CLIENT_PID=
stop() {  # stop PID: SIGTERM, then SIGKILL after 20 s
    kill -0 "$1" 2>/dev/null || return 0
    kill -TERM "$1"
    for _ in $(seq 40); do kill -0 "$1" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    # an interrupted client hangs once the server is gone, so it goes first; its SHM segments are named by its pid
    [ -z "$CLIENT_PID" ] || { stop "$CLIENT_PID"; rm -f /dev/shm/lmcache_kv_"$CLIENT_PID"_*; }
    [ -z "$SERVER_PID" ] || stop "$SERVER_PID"
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

HZ=$(getconf CLK_TCK)
# cpu_sample: BUSY = busy CPU-seconds of the whole machine (/proc/stat); OWN = CPU-seconds of the server plus all
# finished children of this shell (the bench clients). Must run in this shell (not in $(...)) for `times`.
cpu_sample() {
    times >"$TMP/times"
    BUSY=$(awk -v hz="$HZ" '/^cpu / { printf "%.2f\n", ($2 + $3 + $4 + $7 + $8) / hz }' /proc/stat)
    OWN=$({ awk -v hz="$HZ" '{ print ($14 + $15) / hz }' "/proc/$SERVER_PID/stat"; tail -1 "$TMP/times" | tr ms '  '; } \
        | awk 'NF == 1 { s += $1 } NF == 4 { s += $1 * 60 + $2 + $3 * 60 + $4 } END { printf "%.2f\n", s }')
    NOW=$(date +%s.%N)
}
psi() { awk '/^some/ { sub("avg10=", "", $2); print $2 }' /proc/pressure/cpu; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PORT=$(free_port)
HTTP_PORT=$(free_port)
while [ "$HTTP_PORT" = "$PORT" ]; do HTTP_PORT=$(free_port); done
URL="http://127.0.0.1:$HTTP_PORT"
PSI_START=$(psi)

SERVER_CMD=("$LMC" server --host 127.0.0.1 --port "$PORT" --http-host 127.0.0.1 --http-port "$HTTP_PORT"
    --l1-size-gb "$L1_GB" --eviction-policy LRU --chunk-size "$CHUNK")
t0=$(date +%s.%N)
"${SERVER_CMD[@]}" >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
until curl -sf "$URL/healthcheck" >/dev/null; do
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "lmcache server died:" >&2; tail -20 "$TMP/server.log" >&2; exit 1; }
    (( $(date +%s) - ${t0%.*} < 120 )) || { echo "lmcache server not healthy after 120 s" >&2; exit 1; }
    sleep 0.5
done
READY_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
echo "server pid $SERVER_PID ready on zmq :$PORT http :$HTTP_PORT after ${READY_S}s" >&2

jq -cn --arg v "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("lmcache"))')" \
    --arg cmd "${SERVER_CMD[*]}" --argjson ready "$READY_S" --argjson psi "$PSI_START" \
    --argjson load "[$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' ,)]" --argjson cpus "$(nproc)" \
    '{case: "meta", lmcache: $v, server_cmd: $cmd, server_ready_s: $ready, psi_cpu_avg10_before: $psi,
      loadavg: $load, cpus: $cpus, date: (now | todate)}' >"$OUT"

# Per-request samples from the client's log: lines like "[seq 1000/cold] STORE: stored (4096 tokens, 672.5 ms, 1 writers)"
# and "[seq 1000/warm] LOOKUP: 16/16 chunks hit (2.3 ms)" -> {"cold.store": [672.5, ...], "warm.lookup_hits": [16, ...]}
samples() {
    sed -nE 's/.*\[seq [0-9]+\/(cold|warm)\] (LOOKUP|STORE|RETRIEVE): ([0-9]+)?.*[ (]([0-9.]+) ms.*/\1 \2 \4 \3/p' "$1" \
        | jq -cRn '[inputs | split(" ")] | reduce .[] as [$k, $op, $ms, $hits] ({};
            .["\($k).\($op | ascii_downcase)"] += [$ms | tonumber]
            | if $op == "LOOKUP" then .["\($k).lookup_hits"] += [$hits | tonumber] else . end)'
}

# run_case NAME START END NUM_TOKENS [extra bench args...]
run_case() {
    local name=$1 start=$2 end=$3 ntok=$4; shift 4
    local cmd=("$LMC" bench server --mode cpu --transfer-mode lmcache_driven
        --rpc-url "tcp://127.0.0.1:$PORT" --url "$URL" --num-tokens "$ntok"
        --start "$start" --end "$end" --interval 0.5 "$@" --format json --output "$TMP/$name.json")
    local before after busy0 own0 t0 other
    before=$(psi)
    cpu_sample; busy0=$BUSY own0=$OWN t0=$NOW
    "${cmd[@]}" >"$TMP/$name.log" 2>&1 &  # in the background so that a signal reaches the trap at once
    CLIENT_PID=$!
    wait "$CLIENT_PID" || { echo "bench $name failed:" >&2; tail -20 "$TMP/$name.log" >&2; exit 1; }
    CLIENT_PID=
    cpu_sample
    after=$(psi)
    other=$(awk "BEGIN { printf \"%.3f\", ($BUSY - $busy0 - $OWN + $own0) / ($NOW - $t0) }")
    jq -c --arg case "$name" --arg cmd "${cmd[*]}" --argjson b "$before" --argjson a "$after" --argjson o "$other" \
        --argjson wall "$(awk "BEGIN { printf \"%.1f\", $NOW - $t0 }")" --argjson samples "$(samples "$TMP/$name.log")" \
        '{case: $case, cmd: $cmd, psi_cpu_avg10_before: $b, psi_cpu_avg10_after: $a, other_procs_cpu_cores: $o,
          wall_s: $wall, result: ., samples: $samples}' "$TMP/$name.json" >>"$OUT"
    echo "$name done: PSI avg10 $before -> $after, other processes $other cores" >&2
}

run_case store_retrieve_4096 "$START" $((START + REQS)) 4096
run_case lookup_32768 $((START + 500)) $((START + 500 + LOOKUP_REQS)) 32768 \
    --kvcache-shape-spec '(2,2304,16,1,16):float16:2'

METRICS=$(curl -sf "$URL/metrics" | awk '/^lmcache_mp_l1_/ && !/_seconds_/ { printf "%s\t%s\n", $1, $2 }')
stop "$SERVER_PID"  # before the last PSI reading
SERVER_PID=
jq -cRn --argjson psi "$(psi)" '{case: "end", psi_cpu_avg10_after_server_stop: $psi,
    l1_metrics: ([inputs | split("\t") | {(.[0]): (.[1] | tonumber)}] | add)}' <<<"$METRICS" >>"$OUT"
cat "$OUT"
