"""vLLM under serving load, with and without kvtier: time to first token (TTFT) and throughput of real
``vllm serve`` processes driven over the OpenAI completions API (streamed), a fixed number of requests in flight,
next to the in-engine limit (vLLM with a KV space large enough to keep every prompt).

    .venv/bin/python benchmarks/bench_serving.py --workloads multi_round --plot /tmp/serving.png \\
        --out benchmarks/results/serving.jsonl          # one workload x every configuration: ~25 min here

Workloads (prompts are random token ids, so lengths are exact; greedy, ``ignore_eos``, ``--max-tokens`` out;
questions are 40 tokens):

- ``multi_round``: ``--users`` conversations, each a private context of ``--context`` tokens after a shared
  system prompt of ``--system`` tokens, ``--rounds`` rounds each, sent round-robin (user 1 round 1, user 2 round
  1, ..., user 1 round 2, ...): the other users' contexts pass through vLLM between two turns of one user. Round
  r's prompt is system + context + (question_1 + answer_1 + ... + question_{r-1} + answer_{r-1}) + question_r,
  the answers being the ids vLLM generated for the earlier turns. A user's round r+1 is sent only once its round
  r has finished (the next eligible request in round-robin order goes first while a user still waits);
- ``long_doc``: ``--docs`` documents of ``--context`` tokens x ``--questions`` questions each, in a seeded
  shuffled order;
- ``no_reuse``: as many fresh prompts (nothing shared) as ``multi_round`` has users, of its round 1 length: what
  trying to reuse costs when there is nothing to reuse.

Every workload keeps ``--in-flight`` requests outstanding (default 2).

Configurations (each a fresh set of processes: ``vllm serve`` with prefix caching on, ``--enforce-eager --dtype
float32``, ``VLLM_CPU_NUM_OF_RESERVED_CPU=1`` in every one, plain vLLM included, since vLLM's CPU backend reserves
a core when a connector is configured; vLLM's KV space set with ``--num-gpu-blocks-override``, 128-token blocks,
checked against ``vllm:cache_config_info`` in every line):

- ``vllm``: vLLM alone, a small KV space: the larger of a quarter of the workload's distinct tokens and what
  ``--in-flight`` requests of the longest length need (less would make vLLM preempt its running requests); at the
  defaults the latter, 25 blocks: about half of the 4 conversations, less than the 3 that pass between two turns;
- ``vllm_limit``: vLLM alone, a KV space holding every prompt of the workload: the in-engine limit;
- ``kvtier_inproc``: the connector in-process (memory tier only, large enough), small KV space, the connector's
  defaults (loads and stores in the step);
- ``kvtier_server``: the connector on a ``kvtier server`` (memory tier, large enough), off-step transfers on
  (``async_store``, ``enable_async_loading``);
- ``kvtier_decode``: ``kvtier_server`` storing what requests generate too (``save_decode_cache``): multi_round's
  later turns repeat the answers;
- ``kvtier_sync``: ``kvtier_server`` with off-step transfers off (the connector's defaults): the pair shows what
  they buy;
- ``kvtier_disk``: a server with a disk tier behind a memory tier of ~1.5 prompts (a user's next turn finds its
  chunks on disk), off-step transfers on; ``kvtier_disk_cold`` runs on the same processes (both
  caches emptied in between) and drops the disk tier's files from the page cache before every request, so its
  hits read from the device (TTFT is timed after the drop);
- ``kvtier_redis``: the same memory tier, no disk, ``remote_url`` on a ``redis-server`` the benchmark starts.

kvtier's chunk size is 128 (``--chunk-size``), vLLM's CPU block: kvtier reuses whole chunks, so at LMCache's 256 a
hit computes up to 255 tokens past them where vLLM's own cache computes up to 127 (and when vLLM's own hit ends on
an odd block kvtier re-reads the 128 tokens before it), ~0.75 s of TTFT per hit on average at this CPU's prefill
speed: a difference of granularity, not of transfers. ``--extra-config`` adds kvtier keys to every connector. Each
process set runs one warm-up request (an unrelated prompt of the longest length) before measuring, then every chosen
workload (``--passes`` times, fresh prompts each pass); before each run vLLM's prefix cache
(``/reset_prefix_cache``, dev mode), the server's tiers (``/clear``) and Redis (``FLUSHALL``) are emptied, so every
run starts cold (the in-process connector has no reset: it still holds the earlier runs' prompts, which no later
prompt shares).

One JSON line per (workload, configuration, pass): TTFT p50/p90/mean (time to the first streamed token), the
end-to-end latency p50, requests/s and output tokens/s over the workload's wall time, the prompt tokens vLLM
computed, took from its prefix cache and loaded through the connector (``vllm:prompt_tokens_by_source``
before/after), the kvtier server's hit/stored tokens by tier where there is a server, vLLM preemptions,
``outputs_equal_vllm`` (how many requests generated the same ids as in the ``vllm`` configuration: counted, never
asserted) and ``ratio_to_limit`` (TTFT p50 and req/s over ``vllm_limit``'s in the same run). ``vllm_limit`` and
``vllm`` run first, so every later line has both. A configuration that fails gives a line with ``error`` and the
others still run. ``--plot`` draws TTFT p50 and req/s relative to the limit.

Duration: here ``vllm serve`` prefills SmolLM2 fp32 at ~85 tokens/s on its one core (a 1,840-token prompt: 22 s
to its first token on a quiet machine) and decodes at ~6 tokens/s (1.8k context); a process set takes ~1 min to
start and warm up. At the defaults one workload x all configurations is ~16k computed prompt tokens for ``vllm``,
~5k for each of the others, ~7 startups: ~25 min (the sizes suggested first, 6 users x 1,500 tokens x 3 rounds
with 32 output tokens, would take ~45 min).

What the numbers can show on this 2-core machine: vLLM computes on one core, the client, the kvtier server and
Redis share the other, so the comparison is recompute vs. reuse at equal compute, and the ratios taken in one run
are what to read (the CPU is shared and noisy: each line carries the CPU pressure). What they cannot show: a GPU's
prefill/transfer balance (prefill here is orders of magnitude slower than on a GPU, which flatters any reuse and
hides transfer costs), scaling with more instances or cores, and concurrency beyond a few requests; greedy outputs
can differ between configurations because the batch composition (and so float rounding) differs, not only the
cache.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from common import drop_file_cache, emit, prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "storage"))
from redis_servers import RedisServer  # the test suite's process helpers

from servers import HttpProcess, ServerProcess, vllm_serve

MODEL = "smollm2"
BLOCK = 128  # vLLM's KV block size on the CPU backend (platforms/cpu.py)
QUESTION_TOKENS = 40
ASYNC = {"async_store": True, "enable_async_loading": True}
CONFIGS = ["vllm_limit", "vllm", "kvtier_inproc", "kvtier_server", "kvtier_decode", "kvtier_sync", "kvtier_disk",
           "kvtier_disk_cold", "kvtier_redis"]  # fmt: skip
WORKLOADS = ["multi_round", "long_doc", "no_reuse"]
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
KVTIER_COUNTERS = ("kvtier_lookup_hit_tokens_total", "kvtier_retrieve_hit_tokens_total", "kvtier_stored_tokens_total",
                   "kvtier_store_dropped_tokens_total")  # fmt: skip


# -- workloads ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One request: ``tokens`` is the whole prompt, or, in a conversation, the new question after its history."""

    key: str
    tokens: list[int]
    conversation: str | None = None


@dataclass
class Workload:
    name: str
    jobs: list[Job]
    starts: dict[str, list[int]] = field(default_factory=dict)  # each conversation's first tokens

    def sized_prompts(self, max_tokens: int) -> list[list[int]]:
        """Every prompt, the answers a conversation repeats stood for by ``max_tokens`` placeholder ids: for
        sizing only (the real answers are known once generated)."""
        grown = {name: list(start) for name, start in self.starts.items()}
        prompts = []
        for job in self.jobs:
            if job.conversation is None:
                prompts.append(job.tokens)
                continue
            prompts.append(grown[job.conversation] + job.tokens)
            grown[job.conversation] = prompts[-1] + [0] * max_tokens
        return prompts

    def distinct_tokens(self, max_tokens: int) -> int:
        """Tokens of KV the workload leaves in a prefix cache: its distinct whole blocks (a prefix shared by many
        prompts counted once), plus each prompt's partial last block and answer."""
        blocks: set[int] = set()
        rest = 0
        for tokens in self.sized_prompts(max_tokens):
            chain = 0
            for end in range(BLOCK, len(tokens) + 1, BLOCK):
                chain = hash((chain, *tokens[end - BLOCK : end]))  # a block's key names its whole prefix
                blocks.add(chain)
            rest += len(tokens) % BLOCK + max_tokens
        return len(blocks) * BLOCK + rest


def multi_round(args: argparse.Namespace, seed: int) -> Workload:
    system = prompt(args.system, seed)
    starts = {f"u{u}": system + prompt(args.context, seed + 1 + u) for u in range(args.users)}
    jobs = [Job(f"u{u}r{r}", prompt(QUESTION_TOKENS, seed + 1000 + 100 * u + r), f"u{u}")
            for r in range(args.rounds) for u in range(args.users)]  # fmt: skip
    return Workload("multi_round", jobs, starts)


def long_doc(args: argparse.Namespace, seed: int) -> Workload:
    docs = [prompt(args.context, seed + d) for d in range(args.docs)]
    jobs = [Job(f"d{d}q{q}", docs[d] + prompt(QUESTION_TOKENS, seed + 1000 + 100 * d + q))
            for d in range(args.docs) for q in range(args.questions)]  # fmt: skip
    random.Random(seed).shuffle(jobs)
    return Workload("long_doc", jobs)


def no_reuse(args: argparse.Namespace, seed: int) -> Workload:
    length = args.system + args.context + QUESTION_TOKENS  # multi_round's round 1, its system prompt not shared
    return Workload("no_reuse", [Job(f"p{u}", prompt(length, seed + u)) for u in range(args.users)])


BUILDERS: dict[str, Callable[[argparse.Namespace, int], Workload]] = {
    "multi_round": multi_round,
    "long_doc": long_doc,
    "no_reuse": no_reuse,
}


def build(name: str, args: argparse.Namespace, pass_no: int) -> Workload:
    """The workload's prompts for one pass: the same in every configuration, fresh in every pass."""
    return BUILDERS[name](args, 10**6 * (1 + pass_no) + 10**4 * WORKLOADS.index(name))


# -- sizes --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """vLLM's KV spaces and kvtier's tiers, from the workloads to run."""

    longest: int  # the longest prompt
    max_model_len: int
    small_blocks: int
    limit_blocks: int
    kv_bytes_per_token: int

    def gib(self, tokens: float) -> float:
        return tokens * self.kv_bytes_per_token / 2**30


def kv_bytes_per_token() -> int:
    """K and V of every layer, from the model's config (SmolLM2-135M fp32: 2 x 30 x 3 x 64 x 4 = 46,080)."""
    from kvtier.integrations.models import model_path

    config = json.loads((model_path() / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4  # fp32


def sizes(workloads: list[Workload], args: argparse.Namespace) -> Sizes:
    longest = max(len(p) for w in workloads for p in w.sized_prompts(args.max_tokens))
    max_model_len = BLOCK * math.ceil((longest + args.max_tokens) / BLOCK)
    in_flight = args.in_flight * max_model_len // BLOCK + 1  # + vLLM's null block
    distinct = max(w.distinct_tokens(args.max_tokens) for w in workloads)
    small = max(math.ceil(distinct / 4 / BLOCK) + 1, in_flight)
    limit = math.ceil(1.25 * (distinct + longest) / BLOCK) + in_flight  # + the warm-up prompt, + slack
    return Sizes(longest, max_model_len, small, limit, kv_bytes_per_token())


# -- processes ----------------------------------------------------------------------------------------------
@dataclass
class Processes:
    """One configuration's processes, as far as they started; ``disk`` is the disk tier's directory."""

    vllm: HttpProcess | None = None
    server: ServerProcess | None = None
    redis: RedisServer | None = None
    disk: Path | None = None
    kv_blocks: int = 0  # asked of vLLM (--num-gpu-blocks-override)
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        assert self.vllm is not None
        return self.vllm.url

    def stop(self) -> None:
        for process in (self.vllm, self.server, self.redis):
            if process is not None:
                process.stop()


def vllm_process(log: Path, blocks: int, size: Sizes, args: argparse.Namespace, connector: dict | None) -> HttpProcess:
    """``vllm serve`` of the local model with ``blocks`` KV blocks and, unless ``connector`` is None, kvtier's
    connector with that extra config: the same flags and environment in every configuration."""
    env = {
        # vLLM profiles this much, but --num-gpu-blocks-override decides what it allocates
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(size.gib(size.limit_blocks * BLOCK)))),
        "VLLM_SERVER_DEV_MODE": "1",  # for /reset_prefix_cache between runs
    }
    return vllm_serve(log, "--served-model-name", MODEL, "--enable-prefix-caching", "--max-model-len",
                      str(size.max_model_len), "--num-gpu-blocks-override", str(blocks), "--max-num-seqs",
                      str(max(4, args.in_flight)), connector=connector, env=env)  # fmt: skip


def server_process(root: Path, chunk_size: int, *tiers: str) -> ServerProcess:
    """A ``kvtier server`` with the given tier flags (overriding ServerProcess's defaults)."""
    root.mkdir(parents=True, exist_ok=True)
    return ServerProcess(root / "disk", "--chunk-size", str(chunk_size), "--log-level", "WARNING", *tiers)


def start_cache(config: str, root: Path, size: Sizes, args: argparse.Namespace, processes: Processes) -> None:
    """The kvtier server (and Redis) of a server configuration, into ``processes``."""
    big = f"{max(1.0, size.gib(size.limit_blocks * BLOCK) * 1.5):.2f}"  # holds every prompt of a workload
    # the memory tier in front of disk or Redis: ~1.5 prompts, room to stage a store and a read of the slower tier
    # at once (store_dropped_tokens would say if not), far less than the contexts passing between two turns
    tiny = f"{size.gib(size.longest * 1.5):.3f}"
    here = root / config
    if config in ("kvtier_server", "kvtier_decode", "kvtier_sync"):
        processes.server = server_process(here, args.chunk_size, "--max-local-cpu-size", big, "--local-disk", "")
    elif config.startswith("kvtier_disk"):
        processes.disk = here / "tier"
        disk_gib = f"{max(1.0, size.gib(size.limit_blocks * BLOCK) * 4):.2f}"
        processes.server = server_process(here, args.chunk_size, "--max-local-cpu-size", tiny, "--local-disk",
                                          str(processes.disk), "--max-local-disk-size", disk_gib)  # fmt: skip
    elif config == "kvtier_redis":
        processes.redis = RedisServer(here / "redis").start()
        processes.server = server_process(here, args.chunk_size, "--max-local-cpu-size", tiny, "--local-disk", "",
                                          "--remote-url", processes.redis.url)  # fmt: skip
    else:
        raise ValueError(f"unknown configuration {config}")


def connector_config(config: str, size: Sizes, processes: Processes, args: argparse.Namespace) -> dict | None:
    """The connector's extra config of ``config``; None: no connector."""
    extra = {"chunk_size": args.chunk_size, **json.loads(args.extra_config)}
    if config in ("vllm", "vllm_limit"):
        return None
    if config == "kvtier_inproc":
        return {"max_local_cpu_size": max(1.0, size.gib(size.limit_blocks * BLOCK) * 1.5), **extra}
    assert processes.server is not None
    off_step = {} if config == "kvtier_sync" else ASYNC
    decode = {"save_decode_cache": True} if config == "kvtier_decode" else {}
    return {"server_url": f"tcp://127.0.0.1:{processes.server.port}", **off_step, **decode, **extra}


def start(config: str, root: Path, size: Sizes, args: argparse.Namespace) -> Processes:
    """The processes of ``config`` (``kvtier_disk_cold`` is ``kvtier_disk``'s), healthy and warmed up."""
    started = time.perf_counter()
    processes = Processes()
    try:
        if config not in ("vllm", "vllm_limit", "kvtier_inproc"):
            start_cache(config, root, size, args, processes)
        processes.kv_blocks = size.limit_blocks if config == "vllm_limit" else size.small_blocks
        connector = connector_config(config, size, processes, args)
        processes.vllm = vllm_process(root / f"{config}.vllm.log", processes.kv_blocks, size, args, connector)
        processes.vllm.wait_healthy()
        # the first request of a process (and of a length) pays one-time setup, the server's pool mapping too
        asyncio.run(warm_up(processes.url, prompt(size.longest, 999), args.max_tokens))
    except BaseException:
        processes.stop()
        raise
    processes.startup_s = time.perf_counter() - started
    return processes


async def warm_up(url: str, tokens: list[int], max_tokens: int) -> None:
    async with httpx.AsyncClient(timeout=None) as client:
        await complete(client, url, tokens, max_tokens, None)


def reset_caches(processes: Processes) -> None:
    """Empty vLLM's prefix cache, the server's tiers and Redis, so that a run starts cold."""
    for _ in range(50):  # refused while blocks are still held (a request just finishing)
        reply = httpx.post(processes.url + "/reset_prefix_cache", timeout=30)
        reply.raise_for_status()
        if reply.json().get("success"):
            break
        time.sleep(0.2)
    else:
        raise RuntimeError("vLLM refused to reset its prefix cache")
    if processes.server is not None:
        httpx.post(f"http://127.0.0.1:{processes.server.http_port}/clear", timeout=30).raise_for_status()
    if processes.redis is not None:
        with processes.redis.client() as client:
            client.flushall()


# -- requests -----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    prompt_tokens: int
    ttft: float
    latency: float
    output: list[int]


async def complete(
    client: httpx.AsyncClient, url: str, tokens: list[int], max_tokens: int, before: Callable[[], None] | None
) -> Outcome:
    """One streamed completion: seconds to its first token and to its end, and the generated ids."""
    if before is not None:
        await asyncio.to_thread(before)  # before the clock starts; the slot stays taken meanwhile
    body = {"model": MODEL, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    started = time.perf_counter()
    first = None
    output: list[int] = []
    async with client.stream("POST", url + "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
            if ids and first is None:
                first = time.perf_counter()
            output += ids
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return Outcome(len(tokens), first - started, time.perf_counter() - started, output)


async def run_jobs(
    url: str, workload: Workload, in_flight: int, max_tokens: int, before: Callable[[], None] | None
) -> tuple[dict[str, Outcome], float]:
    """Every job of ``workload``, ``in_flight`` at a time, in order, except that a conversation's next turn waits
    for its previous answer (the first job whose conversation is idle goes first); the outcomes and wall time."""
    histories = {name: list(start) for name, start in workload.starts.items()}
    pending = list(workload.jobs)
    busy: set[str] = set()
    running: dict[asyncio.Task[Outcome], tuple[Job, list[int]]] = {}
    outcomes: dict[str, Outcome] = {}
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=in_flight + 1)) as client:
        started = time.perf_counter()
        while pending or running:
            while len(running) < in_flight:
                job = next((j for j in pending if j.conversation is None or j.conversation not in busy), None)
                if job is None:
                    break
                pending.remove(job)
                tokens = job.tokens if job.conversation is None else histories[job.conversation] + job.tokens
                if job.conversation is not None:
                    busy.add(job.conversation)
                task = asyncio.create_task(complete(client, url, tokens, max_tokens, before))
                running[task] = (job, tokens)
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                job, tokens = running.pop(task)
                outcomes[job.key] = outcome = task.result()
                if job.conversation is not None:
                    histories[job.conversation] = tokens + outcome.output  # the next turn repeats the answer
                    busy.discard(job.conversation)
        return outcomes, time.perf_counter() - started


# -- metrics ------------------------------------------------------------------------------------------------
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (name, sorted labels): value


def scrape(url: str) -> Samples:
    """A Prometheus text page's samples."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if not sample.name.endswith("_created")}  # fmt: skip


def vllm_counters(before: Samples, after: Samples) -> dict[str, Any]:
    """Prompt tokens by source and preemptions between two scrapes of vLLM's /metrics."""
    out: dict[str, Any] = {f"prompt_tokens_{s}": 0 for s in SOURCES}
    out["preemptions"] = 0
    for (name, labels), value in after.items():
        delta = int(value - before.get((name, labels), 0.0))
        if name == "vllm:prompt_tokens_by_source_total":
            out[f"prompt_tokens_{dict(labels)['source']}"] += delta
        elif name == "vllm:num_preemptions_total":
            out["preemptions"] += delta
    return out


def kv_blocks(samples: Samples) -> int | None:
    """The KV blocks vLLM allocated (``vllm:cache_config_info``'s label), to check the override took effect."""
    for name, labels in samples:
        blocks = dict(labels).get("num_gpu_blocks")
        if name == "vllm:cache_config_info" and blocks not in (None, "None"):
            return int(blocks)
    return None


def kvtier_counters(before: Samples, after: Samples) -> dict[str, int]:
    """The server's hit and stored tokens (by tier where it says) between two scrapes of its /metrics."""
    out: dict[str, int] = {}
    for (name, labels), value in after.items():
        if name in KVTIER_COUNTERS:
            tier = dict(labels).get("tier")
            short = name.removeprefix("kvtier_").removesuffix("_total") + (f"_{tier}" if tier else "")
            out[short] = out.get(short, 0) + int(value - before.get((name, labels), 0.0))
    return out


# The connector's per-request log lines (docs/vllm.md, "What happens to a request").
LOADED = re.compile(r"Retrieved (\d+) of \d+ prompt tokens \(.*?\) in ([\d.]+) ms \(([\d.]+) ms from kvtier")
STORED = re.compile(r"request \S+: Stored (\d+) tokens .*? in ([\d.]+) ms(?: \(off the step; ([\d.]+) ms in it\))?")


def connector_timings(log: str) -> dict[str, Any]:
    """Medians of the connector's loads (whole, reading from kvtier, then into vLLM's blocks: what a layer-wise
    load could overlap with compute) and stores (whole, and the part the engine step paid) in ``log``."""
    loads = [(float(total), float(fetch)) for n, total, fetch in LOADED.findall(log) if int(n)]
    stores = [(float(total), float(in_step or total)) for _, total, in_step in STORED.findall(log)]

    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    return {
        "loads": len(loads),
        "load_ms_p50": median([t for t, _ in loads]),
        "load_from_kvtier_ms_p50": median([f for _, f in loads]),
        "load_into_blocks_ms_p50": median([t - f for t, f in loads]),
        "stores": len(stores),
        "store_ms_p50": median([t for t, _ in stores]),
        "store_in_step_ms_p50": median([s for _, s in stores]),
        "store_in_step_ms_max": max((s for _, s in stores), default=None),
    }


# -- one run ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    config: str
    workload: str
    pass_no: int
    outcomes: dict[str, Outcome]
    wall_s: float
    counters: dict[str, Any]


def disk_files(disk: Path) -> list[Path]:
    return [path for path in disk.rglob("*") if path.is_file()]


def drop_disk_cache(disk: Path) -> None:
    """Evict the disk tier's files from the page cache (a file may be evicted or renamed meanwhile)."""
    for path in disk_files(disk):
        with contextlib.suppress(OSError):
            drop_file_cache([path])


def measure(config: str, processes: Processes, workload: Workload, pass_no: int, args: argparse.Namespace) -> Run:
    reset_caches(processes)
    disk = processes.disk
    before_request = partial(drop_disk_cache, disk) if config == "kvtier_disk_cold" and disk else None
    server_url = f"http://127.0.0.1:{processes.server.http_port}" if processes.server else None
    vllm_before = scrape(processes.url)
    log_start = processes.vllm.log.stat().st_size if processes.vllm else 0
    server_before = scrape(server_url) if server_url else {}
    jobs = run_jobs(processes.url, workload, args.in_flight, args.max_tokens, before_request)
    outcomes, wall = asyncio.run(jobs)
    time.sleep(1.0)  # stores off the step and vLLM's last stats land after the last reply
    vllm_after = scrape(processes.url)
    counters = vllm_counters(vllm_before, vllm_after)
    counters["vllm_kv_blocks"] = {"asked": processes.kv_blocks, "allocated": kv_blocks(vllm_after)}
    if server_url:
        counters["kvtier"] = kvtier_counters(server_before, scrape(server_url))
    if processes.vllm is not None:
        with open(processes.vllm.log, errors="replace") as log:
            log.seek(log_start)
            counters["connector"] = connector_timings(log.read())
    return Run(config, workload.name, pass_no, outcomes, wall, counters)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def summarize(run: Run, runs: list[Run], processes: Processes, args: argparse.Namespace) -> dict[str, Any]:
    """The JSON record of ``run``, compared with the ``vllm`` and ``vllm_limit`` runs of the same workload."""
    ttfts = [o.ttft for o in run.outcomes.values()]
    output_tokens = sum(len(o.output) for o in run.outcomes.values())
    record: dict[str, Any] = {
        "bench": "serving",
        "workload": run.workload,
        "config": run.config,
        "pass": run.pass_no,
        "requests": len(run.outcomes),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p90": percentile(ttfts, 90),
        "ttft_mean": statistics.fmean(ttfts),
        "latency_p50": percentile([o.latency for o in run.outcomes.values()], 50),
        "wall_s": run.wall_s,
        "req_per_s": len(run.outcomes) / run.wall_s,
        "output_tok_per_s": output_tokens / run.wall_s,
        "prompt_tokens": sum(o.prompt_tokens for o in run.outcomes.values()),
        **run.counters,
    }
    same = {r.config: r for r in runs if r.workload == run.workload and r.pass_no == run.pass_no}
    if "vllm" in same:
        reference = same["vllm"].outcomes
        equal = sum(o.output == reference[key].output for key, o in run.outcomes.items() if key in reference)
        record["outputs_equal_vllm"] = {"equal": equal, "of": len(run.outcomes)}
    else:
        record["outputs_equal_vllm"] = None
    if "vllm_limit" in same:
        ttft, rate = summarize_basic(same["vllm_limit"])
        record["ratio_to_limit"] = {"ttft_p50": record["ttft_p50"] / ttft, "req_per_s": record["req_per_s"] / rate}
    else:
        record["ratio_to_limit"] = None
    record["startup_s"] = processes.startup_s
    record["params"] = {key: getattr(args, key) for key in ("users", "context", "system", "rounds", "docs",
                                                           "questions", "in_flight", "max_tokens")}  # fmt: skip
    record["params"].update(chunk_size=args.chunk_size, question_tokens=QUESTION_TOKENS)
    return record


def summarize_basic(run: Run) -> tuple[float, float]:
    """TTFT p50 and req/s of a run."""
    return percentile([o.ttft for o in run.outcomes.values()], 50), len(run.outcomes) / run.wall_s


# -- the plot -----------------------------------------------------------------------------------------------
def plot(records: list[dict[str, Any]], path: Path) -> None:
    """TTFT p50 and req/s relative to the in-engine limit, per configuration, one column per workload (the
    median over passes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in records if r.get("ratio_to_limit")]
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in usable)]
    if not workloads:
        return
    figure, axes = plt.subplots(2, len(workloads), figsize=(4.5 * len(workloads), 7), squeeze=False)
    for column, workload in enumerate(workloads):
        mine = [r for r in usable if r["workload"] == workload]
        configs = [c for c in CONFIGS if any(r["config"] == c for r in mine)]
        for row, (metric, title) in enumerate((("ttft_p50", "TTFT p50 / limit (lower is better)"),
                                               ("req_per_s", "req/s / limit (higher is better)"))):  # fmt: skip
            values = [statistics.median(r["ratio_to_limit"][metric] for r in mine if r["config"] == c) for c in configs]
            ax = axes[row][column]
            bars = ax.bar(
                range(len(configs)), values, color=["grey" if c.startswith("vllm") else "tab:blue" for c in configs]
            )
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_xticks(range(len(configs)), configs, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{workload}: {title}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- main ---------------------------------------------------------------------------------------------------
def groups(configs: list[str]) -> list[list[str]]:
    """The configurations to measure, limit and plain vLLM first, each list sharing one set of processes
    (``kvtier_disk_cold`` runs on ``kvtier_disk``'s)."""
    ordered = [c for c in CONFIGS if c in configs]
    out: list[list[str]] = []
    for config in ordered:
        if config == "kvtier_disk_cold" and out and out[-1] == ["kvtier_disk"]:
            out[-1].append(config)
        else:
            out.append([config])
    return out


def failure(config: str, exc: Exception) -> dict[str, Any]:
    """The record of a configuration that failed (the end of the message: a process's log tail)."""
    return {"bench": "serving", "config": config, "error": f"{type(exc).__name__}: {exc}"[-3000:]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["multi_round"], choices=WORKLOADS)
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--context", type=int, default=1000, help="tokens of each user's context / document")
    parser.add_argument("--system", type=int, default=256, help="tokens of the shared system prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--questions", type=int, default=3, help="questions per document")
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=BLOCK, help="kvtier's chunk size")
    parser.add_argument("--passes", type=int, default=1, help="runs of each workload per configuration, fresh prompts")
    parser.add_argument("--extra-config", default="{}", help="JSON: more kvtier keys for every connector")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of TTFT p50 and req/s relative to the limit")
    parser.add_argument("--logs", type=Path, default=None, help="keep the processes' logs here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    passes = {(w, p): build(w, args, p) for w in args.workloads for p in range(args.passes)}
    size = sizes(list(passes.values()), args)
    emit({"bench": "serving", "op": "meta", **asdict(size), "configs": args.configs, "workloads": args.workloads},
         args.out)  # fmt: skip
    runs: list[Run] = []
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvtier-serving-") as scratch:
        root = args.logs or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        for group in groups(args.configs):
            config = group[0]
            try:
                processes = start(config, root, size, args)
            except Exception as exc:  # one configuration that cannot start must not lose the others
                emit(failure(config, exc), args.out)
                continue
            try:
                for config in group:
                    for (_, pass_no), workload in passes.items():
                        run = measure(config, processes, workload, pass_no, args)
                        runs.append(run)
                        records.append(summarize(run, runs, processes, args))
                        emit(records[-1], args.out)
            except Exception as exc:
                emit(failure(config, exc), args.out)
            finally:
                processes.stop()
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
