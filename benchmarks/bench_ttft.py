"""Time to first token of SmolLM2-135M-Instruct (fp32, CPU) through kvtier's transformers integration, next to no
cache and to the floor measured in the same run. Prints JSON lines (one per request, one summary per workload and
configuration) and appends them to ``--out``.

Workloads (``--workload``):
  prefix       a shared prefix of ``--prefix-tokens`` plus a new short question per repetition: the full-prefix hit
               of the headline target (>= 10x below no cache, <= 1.3x the floor); medians of ``--reps``.
  multi-round  users x rounds of chat, issued round-robin across users (user 1 round 1, user 2 round 1, ...): the
               prompt is a shared system prompt + the user's whole history (its earlier questions and the answers
               the model generated) + a new question; ``--answer-len`` tokens are generated greedily.
  long-doc     ``--docs`` documents of ``--doc-tokens`` tokens, each asked ``--doc-queries`` questions, in a seeded
               shuffled order; prompt = document + question.
  all          the three, one after the other (the default).

Configurations: no_cache (the model alone); memory (in-process engine); disk (in-process engine whose memory tier
is emptied before each request, so the hits come from the disk tier, page cache warm); disk_cold (the same, with the
chunk files dropped from the page cache too); server (a ``kvtier server`` child process, over shared memory).

Floor = memcpy of the reused KV bytes into a warm buffer + a forward of only the non-reused tokens with the reused
KV already in a DynamicCache (no kvtier), each the best of a few runs, measured right after each request with that
request's reuse (a miss's floor is its own forward). Prompts are generated English-like text, tokenized; everything
is seeded. This 2-core machine is shared: configurations take turns request by request, and ``--threads 1`` keeps
torch from collapsing when another process holds a core (its two OpenMP threads then wait on each other).

    .venv/bin/python benchmarks/bench_ttft.py --plot           # all workloads: ~6 min quiet, ~12 with --threads 1 here
    .venv/bin/python benchmarks/bench_ttft.py --workload prefix --prefix-tokens 4096 --reps 5
    .venv/bin/python benchmarks/bench_ttft.py --quick                     # ~3 minute smoke run, writes nothing
    .venv/bin/python benchmarks/bench_ttft.py --plot-only                 # redraw docs/img/ttft.svg from --out
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvtier import load_config
from kvtier.integrations.backend import InProcessBackend, Loaded
from kvtier.integrations.models import prepare_model
from kvtier.integrations.transformers.cached_model import CachedCausalLM, Generation, Prefill

from common import drop_file_cache, emit, kvtier_server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ttft.jsonl"
PLOT = ROOT / "docs" / "img" / "ttft.svg"
WORKLOADS = ("prefix", "multi-round", "long-doc")
CONFIGS = ("no_cache", "memory", "disk", "disk_cold", "server")
TITLE = "kvtier time to first token, SmolLM2-135M-Instruct fp32 on a shared 2-core CPU"
NEVER = -1  # an EOS id no token has: answers are exactly --answer-len tokens long

# -- prompts ------------------------------------------------------------------------------------------------
SUBJECTS = (
    "the engineer", "a small team", "the harbour master", "our neighbour", "the committee", "a travelling merchant",
    "the old librarian", "the city council", "a young physician", "the orchestra", "the night watchman", "my aunt",
)  # fmt: skip
VERBS = (
    "described", "rebuilt", "measured", "questioned", "painted", "repaired", "carried", "studied", "forgot",
    "discovered", "sold", "explained", "defended", "catalogued", "visited", "photographed",
)  # fmt: skip
OBJECTS = (
    "the river bridge", "a quiet garden", "the annual report", "an unusual map", "the stone chapel",
    "a broken clock", "the northern railway", "several letters", "the winter harvest", "a wooden boat",
    "the town archive", "an old recipe", "the lighthouse", "the market square", "a collection of shells",
)  # fmt: skip
CLAUSES = (
    "before the storms arrived", "after a long discussion", "because the budget was tight", "during the festival",
    "while the children were asleep", "without telling anyone", "in the early morning", "despite the rain",
    "for the second time that year", "as the sun went down", "with great care", "to everyone's surprise",
)  # fmt: skip


def sentence(rng: random.Random) -> str:
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(CLAUSES)}"
    return words[0].upper() + words[1:] + "."


def text_ids(tokenizer: Any, tokens: int, seed: int) -> list[int]:
    """``tokens`` token ids of seeded English-like text (cut at exactly that length)."""
    rng = random.Random(seed)
    text: list[str] = []
    ids: list[int] = []
    while len(ids) < tokens:
        text.extend(sentence(rng) for _ in range(max(8, (tokens - len(ids)) // 8)))  # ~10 tokens a sentence
        ids = tokenizer(" ".join(text), add_special_tokens=False).input_ids
    return ids[:tokens]


@dataclass
class Prompts:
    """Token ids are concatenated, never re-tokenized: the history a user sends back is the tokens it got."""

    tokenizer: Any
    user: list[int] = field(init=False)
    assistant: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.user = self.tokenizer("\nUser:", add_special_tokens=False).input_ids
        self.assistant = self.tokenizer("\nAssistant:", add_special_tokens=False).input_ids

    def text(self, tokens: int, seed: int) -> list[int]:
        return text_ids(self.tokenizer, tokens, seed)

    def question(self, tokens: int, seed: int) -> list[int]:
        return self.user + self.text(tokens, seed) + self.assistant


# -- configurations -------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """One configuration under test: the model behind kvtier (or not), and what runs before each request."""

    name: str
    cached: CachedCausalLM
    use_cache: bool = True
    before_request: Callable[[], None] = lambda: None
    retrieve_seconds: list[float] = field(default_factory=list)  # of the last request (breakdown of load_s)

    def generate(self, ids: list[int], answer_len: int) -> Generation:
        self.before_request()
        self.retrieve_seconds.clear()
        return self.cached.generate(ids, answer_len, eos_token_id=NEVER, use_cache=self.use_cache)

    def prefill(self, ids: list[int]) -> Prefill:
        self.before_request()
        self.retrieve_seconds.clear()
        return self.cached.prefill(ids, use_cache=self.use_cache)


def time_retrieves(setup: Setup) -> None:
    """Record how long the backend's retrieve takes, so load_s splits into retrieve and building the cache."""
    backend = setup.cached.backend
    inner = backend.retrieve

    def retrieve(*args: Any, **kwargs: Any) -> Loaded:
        loaded = inner(*args, **kwargs)
        setup.retrieve_seconds.append(loaded.seconds)
        return loaded

    backend.retrieve = retrieve  # type: ignore[method-assign]


def empty_memory_tier(backend: InProcessBackend, cold: bool) -> Callable[[], None]:
    """Before each request: finish the disk writes, then drop every chunk from memory (and, if ``cold``, the
    chunk files from the page cache), so the hits of the next request are served by the disk tier."""

    def before() -> None:
        backend.engine.flush()
        backend.engine.storage.memory.clear()
        if cold:
            drop_file_cache([p for p in Path(backend.config.local_disk or "").rglob("*") if p.is_file()])

    return before


@contextlib.contextmanager
def open_setup(name: str, model: Any, args: argparse.Namespace, tmp: Path) -> Iterator[Setup]:
    """A fresh, empty cache for configuration ``name``."""
    overrides: dict[str, Any] = {"chunk_size": args.chunk_size, "max_local_cpu_size": 2}
    if name.startswith("disk"):
        overrides |= {"local_disk": str(tmp / f"{name}-{time.monotonic_ns()}"), "max_local_disk_size": 4}
    with contextlib.ExitStack() as stack:
        if name == "server":
            disk = tmp / f"server-disk-{time.monotonic_ns()}"
            overrides["server_url"] = stack.enter_context(
                kvtier_server(chunk_size=args.chunk_size, cpu_gb=2, disk=disk, disk_gb=4, log=tmp / "server.log")
            )
        cached = stack.enter_context(
            CachedCausalLM(model, config=load_config(env={}, overrides=overrides), model_name="smollm2-135m-instruct")
        )
        setup = Setup(name, cached, use_cache=name != "no_cache")
        if name.startswith("disk"):
            assert isinstance(cached.backend, InProcessBackend)
            setup.before_request = empty_memory_tier(cached.backend, cold=name == "disk_cold")
        time_retrieves(setup)
        yield setup


# -- the floor ------------------------------------------------------------------------------------------------
class Floor:
    """What a request must cost at least: copying the reused KV bytes once + computing only the new tokens."""

    def __init__(self, model: Any, bytes_per_token: int, max_tokens: int, reps: int) -> None:
        self.model = model
        self.reps = reps
        self.bytes_per_token = bytes_per_token
        self.src = np.ones(bytes_per_token * max_tokens, np.uint8)
        self.dst = np.ones(bytes_per_token * max_tokens, np.uint8)  # written once: warm, no page faults left

    def memcpy_seconds(self, tokens: int, reps: int = 3) -> float:
        """Best of ``reps`` copies of the KV bytes of ``tokens`` tokens (numpy, one thread, warm buffers)."""
        n = tokens * self.bytes_per_token
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            np.copyto(self.dst[:n], self.src[:n])
            times.append(time.perf_counter() - started)
        return min(times)

    @torch.inference_mode()
    def forward_seconds(self, ids: list[int], reused: int, kv: Any) -> float:
        """A forward of ``ids[reused:]`` with the first ``reused`` tokens' KV (from ``kv``, a filled cache) already
        in a DynamicCache: what the model needs at least once the KV is in place. Best of ``reps`` (a floor)."""
        suffix = torch.tensor([ids[reused:]])
        positions = torch.arange(reused, len(ids)).unsqueeze(0)
        best = float("inf")
        for _ in range(self.reps):
            # The constructor copies these views into contiguous tensors; nothing else stays allocated, so the
            # forward meets the allocator in the same state as a kvtier request does (no extra page faults).
            layers = [(layer.keys[..., :reused, :], layer.values[..., :reused, :]) for layer in kv.layers]
            cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
            del layers
            started = time.perf_counter()
            self.model(
                input_ids=suffix, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            best = min(best, time.perf_counter() - started)
            del cache
        return best

    def of(self, ids: list[int], prefill: Prefill) -> dict[str, float]:
        if prefill.reused_tokens == 0:  # a miss computes everything: its floor is its own forward
            return {
                "floor_s": prefill.forward_seconds,
                "floor_memcpy_s": 0.0,
                "floor_forward_s": prefill.forward_seconds,
            }
        memcpy = self.memcpy_seconds(prefill.reused_tokens)
        forward = self.forward_seconds(ids, prefill.reused_tokens, prefill.cache)
        return {"floor_s": memcpy + forward, "floor_memcpy_s": memcpy, "floor_forward_s": forward}


# -- measuring --------------------------------------------------------------------------------------------------
Serve = Callable[[dict[str, Any], dict[str, list[int]]], dict[str, list[int]]]


@dataclass
class Bench:
    model: Any
    prompts: Prompts
    floor: Floor
    args: argparse.Namespace
    run: str
    out: Path | None

    def emit(self, record: dict[str, Any]) -> None:
        emit({"bench": "ttft", "run": self.run, **record}, self.out)


def prefill_fields(setup: Setup, p: Prefill) -> dict[str, Any]:
    retrieve = sum(setup.retrieve_seconds)
    return {
        "prompt_tokens": p.prompt_tokens,
        "reused_tokens": p.reused_tokens,
        "computed_tokens": p.computed_tokens,
        "tier_tokens": p.tier_tokens,
        "ttft_s": p.ttft_seconds,
        "load_s": p.load_seconds,
        "retrieve_s": retrieve,
        "cache_build_s": p.load_seconds - retrieve,
        "forward_s": p.forward_seconds,
    }


def rotated(items: list[Any], i: int) -> list[Any]:
    """``items`` starting at ``i``: configurations take turns going first, so drift of a noisy machine within a
    request's round hits all of them alike."""
    k = i % len(items)
    return items[k:] + items[:k]


def multi_round(a: argparse.Namespace, p: Prompts, configs: list[str], serve: Serve) -> None:
    """Round-robin across users; each configuration keeps its own histories (the answers it generated)."""
    system = p.text(a.system_tokens, seed=1)
    history = {c: [p.text(a.user_history_tokens, seed=100 + u) for u in range(a.users)] for c in configs}
    for i, (rnd, user) in enumerate(itertools.product(range(a.rounds), range(a.users))):
        question = p.question(a.question_tokens, seed=10_000 + 100 * user + rnd)
        prompts = {c: system + history[c][user] + question for c in configs}
        answers = serve({"i": i, "user": user, "round": rnd}, prompts)
        for c in configs:
            history[c][user] += question + answers[c]


def long_doc(a: argparse.Namespace, p: Prompts, configs: list[str], serve: Serve) -> None:
    docs = [p.text(a.doc_tokens, seed=500 + d) for d in range(a.docs)]
    order = [(d, q) for q in range(a.doc_queries) for d in range(a.docs)]
    random.Random(a.seed).shuffle(order)
    for i, (doc, query) in enumerate(order):
        ids = docs[doc] + p.question(a.question_tokens, seed=20_000 + 100 * doc + query)
        serve({"i": i, "doc": doc, "query": query}, dict.fromkeys(configs, ids))


def run_workload(bench: Bench, name: str, configs: list[str], tmp: Path) -> list[dict[str, Any]]:
    """All configurations, each with its own empty cache, in lockstep: every request is served by each of them
    (in rotating order) before the next request, then the request's floor is measured."""
    records: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with contextlib.ExitStack() as stack:
        setups = [stack.enter_context(open_setup(c, bench.model, bench.args, tmp)) for c in configs]

        def serve(meta: dict[str, Any], prompts: dict[str, list[int]]) -> dict[str, list[int]]:
            gens = {s.name: (s, s.generate(prompts[s.name], bench.args.answer_len)) for s in rotated(setups, meta["i"])}
            floors: dict[tuple[int, int], dict[str, float]] = {}  # one per distinct (prompt, reuse)
            reference = gens["no_cache"][1].token_ids if "no_cache" in gens else None
            for config in configs:
                setup, gen = gens[config]
                ids = prompts[config]
                record = {"kind": "request", "workload": name, "config": config, **meta}
                record |= prefill_fields(setup, gen.prefill) | {"decode_s": gen.decode_seconds}
                if setup.use_cache:
                    key = (hash(tuple(ids)), gen.prefill.reused_tokens)
                    if key not in floors:
                        floors[key] = bench.floor.of(ids, gen.prefill)
                    record |= floors[key]
                    if reference is not None:  # greedy answers through the cache should be the no-cache ones
                        record["same_answer"] = gen.token_ids == reference
                bench.emit(record)
                records[config].append(record)
            return {c: g.token_ids for c, (_, g) in gens.items()}

        {"multi-round": multi_round, "long-doc": long_doc}[name](bench.args, bench.prompts, configs, serve)
    return finish(bench, name, [summarize(name, c, recs) for c, recs in records.items()])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def summarize(workload: str, config: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [r["ttft_s"] for r in records]
    prompt_tokens = sum(r["prompt_tokens"] for r in records)
    reused = sum(r["reused_tokens"] for r in records)
    tiers: dict[str, int] = {}
    for r in records:
        for tier, n in r["tier_tokens"].items():
            tiers[tier] = tiers.get(tier, 0) + n
    out = {
        "kind": "summary",
        "workload": workload,
        "config": config,
        "requests": len(records),
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "prompt_tokens": prompt_tokens,
        "reused_tokens": reused,
        "computed_tokens": sum(r["computed_tokens"] for r in records),
        "hit_rate": reused / prompt_tokens,
        "tier_tokens": tiers,
    }
    if "floor_s" in records[0]:
        out |= {"floor_mean_s": statistics.fmean(r["floor_s"] for r in records)}
        out["ratio_to_floor"] = out["ttft_mean_s"] / out["floor_mean_s"]
        hits = [r for r in records if r["reused_tokens"]]
        if hits:  # a miss's floor is itself: the ratio over hits alone is what the cache path adds
            out["hit_requests"] = len(hits)
            out["ttft_hit_mean_s"] = statistics.fmean(r["ttft_s"] for r in hits)
            out["floor_hit_mean_s"] = statistics.fmean(r["floor_s"] for r in hits)
            out["ratio_to_floor_hits"] = out["ttft_hit_mean_s"] / out["floor_hit_mean_s"]
    same = [r["same_answer"] for r in records if "same_answer" in r]
    if same:
        out["same_answers"] = f"{sum(same)}/{len(same)}"
    return out


def finish(bench: Bench, workload: str, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the speed-up over no cache and the workload's parameters; emit."""
    base = next((s["ttft_mean_s"] for s in summaries if s["config"] == "no_cache"), None)
    params = workload_params(bench.args, workload)
    for s in summaries:
        if base and s["config"] != "no_cache":
            s["speedup_vs_no_cache"] = base / s["ttft_mean_s"]
        s["params"] = params
        bench.emit(s)
    return summaries


def workload_params(a: argparse.Namespace, workload: str) -> dict[str, Any]:
    names = {
        "prefix": ("prefix_tokens", "question_tokens", "reps"),
        "multi-round": ("users", "rounds", "system_tokens", "user_history_tokens", "question_tokens", "answer_len"),
        "long-doc": ("docs", "doc_tokens", "doc_queries", "question_tokens", "answer_len", "seed"),
    }[workload]
    return {n: getattr(a, n) for n in names} | {"chunk_size": a.chunk_size, "threads": torch.get_num_threads()}


# -- the headline: a full hit of a long shared prefix ------------------------------------------------------------
@torch.inference_mode()
def compute_kv(model: Any, ids: list[int]) -> Any:
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def store_prefix(setup: Setup, ids: list[int], kv: Any, tokens: int) -> None:
    """Put the KV of ``ids[:tokens]`` (taken from ``kv``, a filled cache) into the configuration's cache, as the
    request that computed it would have (computing it again per configuration would add minutes, not facts)."""
    layers = [torch.stack((layer.keys[0, :, :tokens], layer.values[0, :, :tokens])) for layer in kv.layers]
    staged = torch.stack(layers).permute(0, 1, 3, 2, 4).contiguous()  # (layers, kv, tokens, heads, head_dim)
    stored = setup.cached.backend.store(np.asarray(ids[:tokens]), staged)
    assert stored == tokens, f"{setup.name}: stored {stored} of {tokens} tokens"
    if isinstance(setup.cached.backend, InProcessBackend):
        setup.cached.backend.engine.flush()


def prefix_hits(bench: Bench, configs: list[str], tmp: Path) -> list[dict[str, Any]]:
    """One warm-up round and ``--reps`` timed rounds; in each, every configuration prefills the prefix + a new
    question (rotating order) and the floor is measured for that prompt."""
    a, p = bench.args, bench.prompts
    prefix = p.text(a.prefix_tokens, seed=2)
    prompts = [prefix + p.question(a.question_tokens, seed=300 + i) for i in range(a.reps + 1)]
    records: dict[str, list[dict[str, Any]]] = {c: [] for c in [*configs, "floor"]}
    with contextlib.ExitStack() as stack:
        setups = [stack.enter_context(open_setup(c, bench.model, a, tmp)) for c in configs]
        kv = compute_kv(bench.model, prefix)
        for setup in setups:
            if setup.use_cache:
                store_prefix(setup, prefix, kv, a.prefix_tokens)
        for i, ids in enumerate(prompts):
            for setup in rotated(setups, i):
                if i == 0 and not setup.use_cache:
                    continue  # the warm-up is for the cache paths (staging buffers, first use of each tier)
                record = prefill_fields(setup, setup.prefill(ids)) | {"rep": i}
                if i:
                    records[setup.name].append(record)
                    bench.emit({"kind": "request", "workload": "prefix", "config": setup.name, **record})
            memcpy = bench.floor.memcpy_seconds(a.prefix_tokens)
            forward = bench.floor.forward_seconds(ids, a.prefix_tokens, kv)
            if i:
                floor = {"floor_s": memcpy + forward, "floor_memcpy_s": memcpy, "floor_forward_s": forward, "rep": i}
                records["floor"].append(floor)
                bench.emit({"kind": "request", "workload": "prefix", "config": "floor", **floor})
    return finish(bench, "prefix", summarize_prefix(records))


def summarize_prefix(records: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Medians over the repetitions; also the median of per-repetition ratios (each against the floor and the
    no-cache prefill of its own round, measured seconds apart)."""
    floors = records.pop("floor")
    floor = {r["rep"]: r["floor_s"] for r in floors}
    med = {
        f"{k}_median": statistics.median(r[k] for r in floors) for k in ("floor_s", "floor_memcpy_s", "floor_forward_s")
    }
    no_cache = {r["rep"]: r["ttft_s"] for r in records.get("no_cache", [])}
    out = []
    for config, recs in records.items():
        s = summarize("prefix", config, recs)
        keys = ("ttft_s", "load_s", "retrieve_s", "cache_build_s", "forward_s")
        s |= {f"{k}_median": statistics.median(r[k] for r in recs) for k in keys}
        s["ttft_median_s"] = s.pop("ttft_s_median")
        if config != "no_cache":
            s |= med
            s["ratio_to_floor"] = s["ttft_median_s"] / med["floor_s_median"]
            s["ratio_to_floor_paired"] = statistics.median(r["ttft_s"] / floor[r["rep"]] for r in recs)
            s["meets_floor_1_3x"] = s["ratio_to_floor"] <= 1.3
            if no_cache:
                s["speedup_median_vs_no_cache"] = statistics.median(no_cache.values()) / s["ttft_median_s"]
                s["speedup_paired"] = statistics.median(no_cache[r["rep"]] / r["ttft_s"] for r in recs)
                s["meets_10x"] = s["speedup_median_vs_no_cache"] >= 10
        out.append(s)
    return out


# -- the plot -------------------------------------------------------------------------------------------------
COLORS = {
    "no_cache": "#9e9e9e",
    "memory": "#1f77b4",
    "disk": "#2ca02c",
    "disk_cold": "#98df8a",
    "server": "#ff7f0e",
    "floor": "#d62728",
}


def bar_values(summaries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """workload -> config -> TTFT in seconds (prefix: medians; the others: means), with the floor as a config."""
    values: dict[str, dict[str, float]] = {}
    for s in summaries:
        if s.get("kind") != "summary":
            continue
        w = values.setdefault(s["workload"], {})
        w[s["config"]] = s.get("ttft_median_s", s["ttft_mean_s"])
        floor = s.get("floor_s_median", s.get("floor_mean_s"))
        if floor is not None and (s["config"] == "memory" or "floor" not in w):
            w["floor"] = floor  # the memory configuration's floor (the others' are within noise of it)
    return values


def fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s >= 1 else f"{s * 1e3:.0f} ms"


def plot_svg(summaries: list[dict[str, Any]], path: Path, title: str) -> None:
    """A grouped bar chart, log scale (no cache is 10-50x the others), written as plain SVG."""
    values = bar_values(summaries)
    groups = [w for w in WORKLOADS if w in values]
    order = [*CONFIGS, "floor"]
    bar, gap, left, top, height = 34, 40, 70, 50, 300
    per_group = [[c for c in order if c in values[w]] for w in groups]
    width = left + sum(len(g) * bar + gap for g in per_group) + 150
    lo = 10 ** np.floor(np.log10(min(v for w in values.values() for v in w.values())))
    hi = 10 ** np.ceil(np.log10(max(v for w in values.values() for v in w.values())))

    def y(v: float) -> float:
        return top + height * (1 - (np.log10(v) - np.log10(lo)) / (np.log10(hi) - np.log10(lo)))

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + height + 60}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="100%" height="100%" fill="white"/><text x="{left}" y="22" font-size="14">{title}</text>',
    ]
    tick = lo
    while tick <= hi * 1.001:  # decades on the log axis
        svg.append(f'<line x1="{left}" x2="{width - 150}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        label = f"{tick:g} s" if tick >= 1 else f"{tick * 1e3:g} ms"
        svg.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{label}</text>')
        tick *= 10
    x = left + gap / 2
    for workload, configs in zip(groups, per_group, strict=True):
        for c in configs:
            v = values[workload][c]
            svg.append(
                f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bar - 4}" height="{top + height - y(v):.1f}" '
                f'fill="{COLORS[c]}"><title>{workload} {c}: {fmt_seconds(v)}</title></rect>'
            )
            svg.append(
                f'<text x="{x + (bar - 4) / 2:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" font-size="9">'
                f"{fmt_seconds(v)}</text>"
            )
            x += bar
        label = "prefix hit (median)" if workload == "prefix" else f"{workload} (mean)"
        middle = x - len(configs) * bar / 2 - 2
        svg.append(f'<text x="{middle:.1f}" y="{top + height + 18}" text-anchor="middle">{label}</text>')
        x += gap
    for i, c in enumerate(order):  # legend
        ly = top + 10 + 18 * i
        svg.append(f'<rect x="{width - 130}" y="{ly - 9}" width="12" height="12" fill="{COLORS[c]}"/>')
        svg.append(f'<text x="{width - 112}" y="{ly + 1}">{c.replace("_", " ")}</text>')
    svg.append(
        f'<text x="{left}" y="{top + height + 44}" fill="#555">time to first token, log scale; '
        "floor = memcpy of the reused KV + forward of the new tokens only, same run</text></svg>"
    )
    threads = sorted({str(s["params"]["threads"]) for s in summaries if "params" in s})
    svg[1] = svg[1].replace("</text>", f" (torch threads: {', '.join(threads)})</text>", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(svg) + "\n")


def latest_summaries(path: Path, run: str | None = None) -> list[dict[str, Any]]:
    """Each workload's summaries from the last run that measured it (or from run ``run`` only)."""
    latest: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") != "summary" or run not in (None, r["run"]):
            continue
        newest, recs = latest.get(r["workload"], ("", []))
        if r["run"] > newest:
            latest[r["workload"]] = (r["run"], [r])
        elif r["run"] == newest:
            recs.append(r)
    return [s for _, recs in latest.values() for s in recs]


# -- main -------------------------------------------------------------------------------------------------------
QUICK = {
    "prefix_tokens": 1024,
    "reps": 2,
    "users": 2,
    "rounds": 2,
    "system_tokens": 512,
    "user_history_tokens": 64,
    "docs": 2,
    "doc_tokens": 512,
    "doc_queries": 2,
    "answer_len": 8,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="all", choices=[*WORKLOADS, "all"])
    parser.add_argument("--configs", nargs="+", default=None, choices=CONFIGS, help="default: all but disk_cold "
                        "(prefix: all)")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a ~3 minute smoke run")
    parser.add_argument("--prefix-tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5, help="prefix: timed repetitions (after one warm-up)")
    parser.add_argument("--floor-reps", type=int, default=2, help="the floor's forward: best of this many")
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--answer-len", type=int, default=16)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=1024, help="multi-round: shared system prompt")
    parser.add_argument("--user-history-tokens", type=int, default=256, help="multi-round: each user's first context")
    parser.add_argument("--docs", type=int, default=3)
    parser.add_argument("--doc-tokens", type=int, default=2048)
    parser.add_argument("--doc-queries", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="long-doc: order of the queries")
    parser.add_argument("--out", type=Path, default=None, help=f"append JSON lines here (default {RESULTS}; "
                        "--quick: nowhere)")  # fmt: skip
    parser.add_argument("--plot", action="store_true", help=f"draw {PLOT} from this run (and earlier ones in --out)")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plot from --out")
    parser.add_argument("--run", default=None, help="--plot-only: the run (its `run` field) to draw; default: latest")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    if args.out is None and not args.quick:
        args.out = RESULTS
    return args


def main() -> None:
    args = parse_args()
    if args.plot_only:
        plot_svg(latest_summaries(args.out or RESULTS, args.run), PLOT, TITLE)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("kvtier").setLevel(logging.WARNING)
    path = prepare_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = Prompts(AutoTokenizer.from_pretrained(path))
    longest = max(
        args.prefix_tokens + args.question_tokens + 8,
        args.doc_tokens + args.question_tokens + 8,
        args.system_tokens
        + args.user_history_tokens
        + args.rounds * (args.question_tokens + args.answer_len + 8)
        + args.answer_len,
    )
    if longest > model.config.max_position_embeddings:
        raise SystemExit(f"prompts of up to {longest} tokens exceed the model's {model.config.max_position_embeddings}")
    bytes_per_token = CachedCausalLM(model).layout.bytes_per_token
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    bench = Bench(model, prompts, Floor(model, bytes_per_token, longest, args.floor_reps), args, run, args.out)
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    summaries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvtier-ttft-") as tmp:
        for workload in workloads:
            configs = sorted(
                args.configs or [c for c in CONFIGS if c != "disk_cold" or workload == "prefix"], key=CONFIGS.index
            )
            started = time.perf_counter()
            if workload == "prefix":
                summaries += prefix_hits(bench, configs, Path(tmp))
            else:
                summaries += run_workload(bench, workload, configs, Path(tmp))
            logging.getLogger("bench").warning("%s took %.0f s", workload, time.perf_counter() - started)
    print_table(summaries)
    if args.plot:
        earlier = latest_summaries(args.out) if args.out and args.out.exists() else summaries
        plot_svg(earlier, PLOT, TITLE)


def print_table(summaries: list[dict[str, Any]]) -> None:
    """A readable summary on stderr (stdout carries only JSON lines)."""
    for s in summaries:
        ttft = s.get("ttft_median_s", s["ttft_mean_s"])
        parts = [f"# {s['workload']:<11} {s['config']:<9} ttft {fmt_seconds(ttft):>8}"]
        if "ratio_to_floor" in s:
            parts.append(f"floor x{s['ratio_to_floor']:.2f}")
        if "ratio_to_floor_hits" in s:
            parts.append(f"(hits x{s['ratio_to_floor_hits']:.2f})")
        speedup = s.get("speedup_median_vs_no_cache", s.get("speedup_vs_no_cache"))
        if speedup:
            parts.append(f"speedup x{speedup:.1f}")
        parts.append(f"hit {s['hit_rate']:.0%} {s['tier_tokens']}")
        print("  ".join(parts), file=sys.stderr)


if __name__ == "__main__":
    main()
