"""Time to first token of vLLM (CPU, SmolLM2-135M fp32) with and without kvtier, after a vLLM restart.

    python benchmarks/bench_vllm.py [--lengths 2000 4000] [--repeats 3] [--chunk-size 128]

Cases, each over ``--repeats`` distinct prompts per length (medians reported):

- ``cold``: a prompt vLLM has never seen (nothing cached);
- ``vllm_prefix_warm``: the same prompt again in the same process (vLLM's own prefix cache);
- ``kvtier_after_restart``: a new vLLM process with KVTierConnector (server mode) on prompts a previous vLLM
  process stored in the kvtier server;
- ``example_after_restart``: the same with vLLM's in-tree ExampleConnector (safetensors files), as a baseline.

TTFT is the wall time of ``generate(max_tokens=1)``. Every vLLM process first runs an unrelated warm-up prompt of
the longest length measured (the first request of a process, and of a length, pays one-time setup). One JSON line
per case and length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import emit, kvtier_server, prompt

MAX_MODEL_LEN = 4096 + 64


def child(spec: dict[str, Any]) -> None:
    """One vLLM process: TTFT of each prompt (in order), printed as JSON lines."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvtier.integrations.models import model_path

    kwargs: dict[str, Any] = {}
    if spec["connector"] == "kvtier":
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"server_url": spec["server_url"], "chunk_size": spec["chunk_size"]},
        )
    elif spec["connector"] == "example":
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="ExampleConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": spec["storage"]},
        )
    llm = LLM(
        model=str(model_path()),
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        enable_prefix_caching=spec["prefix_caching"],
        max_num_seqs=1,
        **kwargs,
    )
    params = SamplingParams(temperature=0.0, max_tokens=1)
    # Warm-up: the first request of a process, and the first one of a given length, pay one-time setup that is
    # not what is measured. Its prompt is the same in every process: a hit in a process with a connector.
    longest = max(item["length"] for item in spec["prompts"])
    llm.generate([{"prompt_token_ids": prompt(longest, 999)}], params, use_tqdm=False)
    for item in spec["prompts"]:
        started = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt(item["length"], item["seed"])}], params, use_tqdm=False)
        ttft = time.perf_counter() - started
        print("RESULT " + json.dumps({**item, "ttft_s": ttft}), flush=True)


def run_child(spec: dict[str, Any], log: Path) -> list[dict[str, Any]]:
    # vLLM's CPU backend reserves one more core for itself whenever a KV connector is configured; on 2 cores that
    # leaves none and it computes on both, while without a connector it computes on one. Pinning the reservation
    # makes every configuration compute on the same core(s), or the comparison measures the core count.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    with open(log, "a") as out:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            env=env,
            check=False,
        )
    if proc.returncode:
        raise RuntimeError(f"vLLM child failed ({proc.returncode}); see {log}")
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def prompts(lengths: list[int], repeats: int, case: str, seed0: int) -> list[dict[str, Any]]:
    return [
        {"case": case, "length": n, "seed": seed0 + 100 * i + j} for j, n in enumerate(lengths) for i in range(repeats)
    ]


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    by_case: dict[tuple[str, int], list[float]] = {}
    for r in results:
        by_case.setdefault((r["case"], r["length"]), []).append(r["ttft_s"])
    for (case, length), times in sorted(by_case.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cold = statistics.median(by_case[("cold", length)])
        warm = statistics.median(by_case[("vllm_prefix_warm", length)])
        med = statistics.median(times)
        emit(
            {
                "bench": "vllm_ttft",
                "case": case,
                "prompt_tokens": length,
                "ttft_median_s": round(med, 4),
                "ttft_min_s": round(min(times), 4),
                "ttft_max_s": round(max(times), 4),
                "repeats": len(times),
                "speedup_vs_cold": round(cold / med, 2),
                "vs_vllm_prefix_warm": round(med / warm, 2),
                "chunk_size": args.chunk_size,
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    results: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    log = work / "vllm.log"
    print(f"# logs: {log}", file=sys.stderr)
    # cold and vLLM-warm: each prompt twice in one process with vLLM's prefix cache on
    plain = prompts(args.lengths, args.repeats, "cold", 1)
    twice = [p for item in plain for p in (item, {**item, "case": "vllm_prefix_warm"})]
    results += run_child({"connector": None, "prefix_caching": True, "prompts": twice}, log)

    stored = prompts(args.lengths, args.repeats, "stored", 1000)
    with kvtier_server(chunk_size=args.chunk_size, cpu_gb=4, log=work / "server.log") as url:
        kvtier = {"connector": "kvtier", "server_url": url, "chunk_size": args.chunk_size, "prefix_caching": False}
        run_child({**kvtier, "prompts": stored}, log)  # the first vLLM process stores
        hits = [{**p, "case": "kvtier_after_restart"} for p in stored]
        results += run_child({**kvtier, "prompts": hits}, log)  # a restarted vLLM loads

    example = {"connector": "example", "storage": str(work / "example"), "prefix_caching": False}
    run_child({**example, "prompts": stored}, log)
    results += run_child({**example, "prompts": [{**p, "case": "example_after_restart"} for p in stored]}, log)
    report(results, args)


if __name__ == "__main__":
    main()
