"""Time to first token of prefill/decode disaggregation through ``kvtier proxy``, next to one vLLM computing the
prompt itself, broken into the prefill, the decoder's load of the handed-off KV, and the rest.

    python benchmarks/bench_disagg.py [--lengths 512 1024 1536] [--repeats 3]

Starts a ``kvtier server`` (memory tier), a plain ``vllm serve`` (no connector: the baseline), a prefiller
(``kv_producer``, stores off its step) and a decoder (``kv_consumer``), SmolLM2-135M fp32 on this CPU, each with one
reserved core, and ``kvtier proxy`` in front of the last two. Each prompt (distinct random token ids, one request
at a time, streamed, ``max_tokens`` 8) goes once to the plain vLLM and once through the proxy. Reported per length
(medians over the repeats):

- ``single_ttft``: the plain vLLM's first streamed token;
- ``proxy_ttft``: the same through the proxy, = ``prefill`` (the proxy's ``x-kvtier-prefill-seconds``: the
  prefiller computes the prompt and answers) + the decoder's first token, of which ``load`` (the decoder's log:
  reading the chunks from kvtier and into vLLM's blocks) is the hand-off and the rest (``decode_rest``: the prompt
  tokens past the last whole chunk, the first output token, any wait for the KV, the proxy) the first decode step;
- ``handoff_fraction``: ``load / prefill``; ``store_off_step``: the prefiller's store (its log), which a store in
  the step would add to the prefill.

On this 2-core machine the instances share the CPU, one request runs at a time, so the numbers show what the
hand-off costs next to a prefill, not what disaggregation buys under load (no decode is interrupted here).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common import emit, free_port, prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
# the test suite's process helpers
from servers import HttpProcess, ServerProcess, vllm_serve, vllm_serve_with_server

CHUNK = 256
MODEL = "smollm2"
MAX_TOKENS = 8
VLLM_ARGS = ("--served-model-name", MODEL, "--max-model-len", "4096", "--max-num-seqs", "4")


def first_token_seconds(url: str, tokens: list[int]) -> tuple[float, httpx.Headers]:
    """Seconds to the first streamed token of a completion, and the reply's headers."""
    body = {"model": MODEL, "prompt": tokens, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        lines = reply.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"text"' in line:
                elapsed = time.perf_counter() - started
                for _ in lines:  # read the rest: the next request starts on an idle engine
                    pass
                return elapsed, reply.headers
    raise RuntimeError("the stream ended without a token")


def logged_ms(log: str, request_id: str, what: str) -> float | None:
    """The milliseconds the connector's ``what`` line (Retrieved / Stored) for the request logs."""
    found = re.search(rf"request \S*{request_id}\S*: {what} .*? in ([\d.]+) ms", log)
    return float(found.group(1)) if found else None


def measure(urls: dict[str, str], logs: dict[str, Path], tokens: list[int]) -> dict[str, Any]:
    single, _ = first_token_seconds(urls["single"], tokens)
    through, headers = first_token_seconds(urls["proxy"], tokens)
    prefill = float(headers["x-kvtier-prefill-seconds"])
    request_id = headers["x-request-id"]
    time.sleep(0.5)  # the log lines are written as the requests end
    load_ms = logged_ms(logs["decoder"].read_text(), request_id, "Retrieved")
    store_ms = logged_ms(logs["prefiller"].read_text(), request_id, "Stored")
    load = (load_ms or 0.0) / 1e3
    return {
        "single_ttft": single,
        "proxy_ttft": through,
        "prefill": prefill,
        "load": load,
        "decode_rest": through - prefill - load,
        "handoff_fraction": load / prefill,
        "store_off_step": (store_ms or 0.0) / 1e3,
        "prefill_outcome": headers["x-kvtier-prefill"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 1536])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvtier-disagg-") as scratch:
        root = Path(scratch)
        server = ServerProcess(root / "disk", "--chunk-size", str(CHUNK), "--max-local-cpu-size", "2",
                               "--max-local-disk-size", "0.5")  # fmt: skip
        started: dict[str, HttpProcess] = {}
        try:
            started["single"] = vllm_serve(root / "single.log", "--no-enable-prefix-caching", *VLLM_ARGS)
            off_step = {"async_store": True}
            started["prefiller"] = vllm_serve_with_server(root / "prefiller.log", server.port, role="kv_producer",
                                             chunk_size=CHUNK, extra_config=off_step, args=VLLM_ARGS)  # fmt: skip
            started["decoder"] = vllm_serve_with_server(root / "decoder.log", server.port, role="kv_consumer",
                                           chunk_size=CHUNK, args=VLLM_ARGS)  # fmt: skip
            for process in started.values():
                process.wait_healthy()
            proxy_port = free_port()
            command = [sys.executable, "-m", "kvtier.cli.main", "proxy", "--prefiller", started["prefiller"].url,
                       "--decoder", started["decoder"].url, "--port", str(proxy_port)]  # fmt: skip
            started["proxy"] = HttpProcess(command, root / "proxy.log", f"http://127.0.0.1:{proxy_port}")
            started["proxy"].wait_healthy(60)
            urls = {name: process.url for name, process in started.items()}
            logs = {name: process.log for name, process in started.items()}
            measure(urls, logs, prompt(args.lengths[-1], 10**6))  # each process's first request pays setup
            for length in args.lengths:
                runs = [measure(urls, logs, prompt(length, length * 100 + k)) for k in range(args.repeats)]
                medians = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "prefill_outcome"}
                emit({"bench": "disagg", "prompt_tokens": length, "chunk_size": CHUNK, "repeats": args.repeats,
                      **medians, "prefill_outcomes": sorted({r["prefill_outcome"] for r in runs})})  # fmt: skip
        finally:
            for process in reversed(started.values()):
                process.stop()
            server.stop()


if __name__ == "__main__":
    main()
