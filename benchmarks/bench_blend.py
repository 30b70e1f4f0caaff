"""Blending (CacheBlend) on SmolLM2-135M-Instruct (fp32, CPU): answer quality against full recompute, and time to
first token against full recompute and the floor. Prints JSON lines and appends them to ``--out``.

quality  The seeded multi-passage QA set (``kvtier.quality.qa``): per context, its passages are first prefilled in
         their own order (which stores them: prefix chunks and segments); then each question is asked with the
         passages in an order of its own, the answer's passage never first. Methods, each with its own cache warmed
         the same way: ``full`` (recompute everything, the reference), ``prefix`` (prefix caching only: what
         kvtier did before blending), ``reuse`` (the segments' stored KV as it is: ratio 0) and ``blend@r`` for
         each ``--ratios``. Per question and method: the greedy answer's exact match and token F1 (SQuAD
         normalisation), the gold answer's mean log-probability, the KL divergence of the first token's
         distribution from full recompute's, whether the greedy answer equals full recompute's, TTFT.
ttft     ``--passages`` passages of ``--passage-tokens`` tokens cached as segments, then asked in another order:
         TTFT of full recompute, of blending at each ratio, and the floor measured in the same run (a memcpy of the
         loaded segments' bytes + the model's own layers over the tokens blending computes: every token for the
         first ``blend_check_layers`` layers, then the recomputed and fresh tokens only), medians of ``--reps``.

    .venv/bin/python benchmarks/bench_blend.py quality --contexts 40 --plot      # 240 questions: ~30 min here
    .venv/bin/python benchmarks/bench_blend.py ttft --reps 5 --plot
    .venv/bin/python benchmarks/bench_blend.py quality --contexts 40 --resume   # goes on after an interruption
    .venv/bin/python benchmarks/bench_blend.py quality --contexts 2             # a smoke run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvtier import load_config
from kvtier.integrations.backend import InProcessBackend
from kvtier.integrations.models import prepare_model
from kvtier.integrations.transformers import CachedCausalLM, kv_layout_of
from kvtier.quality.qa import Question, make_qa_set
from kvtier.quality.scoring import exact_match, first_line, kl_divergence, mean_log_prob, token_f1

from common import emit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HEADER = (
    "<|im_start|>system\nYou answer questions about the documents below. Reply with the answer only, in as few "
    "words as possible.<|im_end|>\n<|im_start|>user\nDocuments:\n"
)
TAIL = "\n\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n"
CHUNK = 32
MIN_SEGMENT = 64


@dataclass
class Method:
    name: str
    lm: CachedCausalLM | None  # None: full recompute (no cache)


def make_method(model: Any, tokenizer: Any, name: str, **overrides: Any) -> Method:
    config = load_config(
        env={}, overrides={"chunk_size": CHUNK, "max_local_cpu_size": 2.0, "log_level": "WARNING", **overrides}
    )
    backend = InProcessBackend(config, kv_layout_of(model), model_name="smollm2")
    return Method(name, CachedCausalLM(model, backend, config=config, tokenizer=tokenizer))


def blending(ratio: float) -> dict[str, Any]:
    return {"enable_blending": True, "blend_recompute_ratios": ratio, "blend_min_tokens": MIN_SEGMENT}


def prompt_ids(lm: CachedCausalLM, passages: list[str], question: str) -> list[int]:
    ids, _ = lm.join([HEADER, *passages, TAIL.format(question=question)])
    return ids


def answer(lm: CachedCausalLM, prefill: Any, gold: list[int], max_new: int, stop: set[int]) -> tuple[str, float]:
    """The greedy answer after ``prefill`` and the gold answer's mean log-probability under the same KV."""
    model, cache, n = lm.model, prefill.cache, prefill.prompt_tokens
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([gold]), past_key_values=cache, use_cache=True).logits[0]
        logprob = mean_log_prob(prefill.logits, logits.float(), gold)
        cache.crop(n)
        tokens = [prefill.first_token]
        while len(tokens) < max_new and tokens[-1] not in stop:
            step = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
            tokens.append(int(step[0, -1].argmax()))
    text = lm.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True)
    return first_line(text), logprob


def run_quality(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    path = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stop = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id, *tokenizer("\n").input_ids}
    qa = make_qa_set(contexts=args.contexts, seed=args.seed)
    reference = make_method(model, tokenizer, "joiner", **blending(0.0))  # only to tokenize and join prompts
    out = args.out or RESULTS / "blend_quality.jsonl"
    rows = finished_rows(out, qa) if args.resume else []
    done = {row["context"] for row in rows}
    for index, context in enumerate(qa.contexts):
        if index in done:
            continue
        methods = [Method("full", None), make_method(model, tokenizer, "prefix")]
        methods += [make_method(model, tokenizer, "reuse", **blending(0.0))]
        methods += [make_method(model, tokenizer, f"blend@{r:g}", **blending(r)) for r in args.ratios]
        warm = prompt_ids(reference.lm, context.passages, "-")  # type: ignore[arg-type]
        for method in methods:
            if method.lm is not None:
                method.lm.prefill(warm)  # stores the passages: prefix chunks and segments
        for question in context.questions:
            rows += ask(question, context.passages, methods, reference.lm, stop, args, out)  # type: ignore[arg-type]
        for method in methods:
            if method.lm is not None:
                method.lm.close()
    summarize(rows, out)
    if args.plot:
        plot_quality(out)


def finished_rows(out: Path, qa: Any) -> list[dict[str, Any]]:
    """The rows of the contexts a run interrupted before (a restart, a kill) already wrote in full to ``out``."""
    import json

    if not out.exists():
        return []
    rows = [json.loads(line) for line in out.read_text().splitlines() if '"blend_quality"' in line]
    by_context: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_context.setdefault(row["context"], []).append(row)
    wanted = {index: len(c.questions) for index, c in enumerate(qa.contexts)}
    methods = len({row["method"] for row in rows})
    return [
        row
        for index, mine in by_context.items()
        if index in wanted and len(mine) == wanted[index] * methods
        for row in mine
    ]


def ask(
    question: Question,
    passages: list[str],
    methods: list[Method],
    joiner: CachedCausalLM,
    stop: set[int],
    args: argparse.Namespace,
    out: Path,
) -> list[dict[str, Any]]:
    ids = prompt_ids(joiner, [passages[i] for i in question.order], question.text)
    gold = joiner.tokenizer(question.answer, add_special_tokens=False).input_ids
    results, full_logits, full_answer = [], None, None
    for method in methods:
        lm = method.lm or joiner
        prefill = lm.prefill(ids, use_cache=method.lm is not None, store=False)
        text, logprob = answer(lm, prefill, gold, args.max_new_tokens, stop)
        if method.lm is None:
            full_logits, full_answer = prefill.logits, text
        assert full_logits is not None
        record = {
            "bench": "blend_quality",
            "method": method.name,
            "context": question.context,
            "kind": question.kind,
            "question": question.text,
            "gold": question.answer,
            "answer": text,
            "em": exact_match(text, question.answer),
            "f1": token_f1(text, question.answer),
            "gold_logprob": logprob,
            "kl_first_token": kl_divergence(full_logits, prefill.logits),
            "same_answer_as_full": text == full_answer,
            "ttft_s": prefill.ttft_seconds,
            "prompt_tokens": prefill.prompt_tokens,
            "reused_tokens": prefill.reused_tokens,
            "recomputed_tokens": prefill.recomputed_tokens,
            "segments_reused": prefill.segments_reused,
        }
        emit(record, out)
        results.append(record)
    return results


def summarize(rows: list[dict[str, Any]], out: Path) -> None:
    for kind in ("single", "two-hop"):
        for name in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == name and r["kind"] == kind]
            if not mine:
                continue
            emit(
                {
                    "bench": "blend_quality_summary",
                    "method": name,
                    "kind": kind,
                    "questions": len(mine),
                    "em": statistics.mean(r["em"] for r in mine),
                    "f1": statistics.mean(r["f1"] for r in mine),
                    "gold_logprob": statistics.mean(r["gold_logprob"] for r in mine),
                    "kl_first_token": statistics.mean(r["kl_first_token"] for r in mine),
                    "same_answer_as_full": statistics.mean(r["same_answer_as_full"] for r in mine),
                    "ttft_s_median": statistics.median(r["ttft_s"] for r in mine),
                    "recomputed_share": statistics.mean(
                        r["recomputed_tokens"] / max(1, r["prompt_tokens"]) for r in mine
                    ),
                },
                out,
            )


# -- TTFT ---------------------------------------------------------------------------------------------------
def run_ttft(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    path = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = args.out or RESULTS / "blend_ttft.jsonl"
    qa = make_qa_set(contexts=1, passages=args.passages, filler_sentences=args.passage_tokens // 10, seed=args.seed)
    passages = [_trim(tokenizer, p, args.passage_tokens) for p in qa.contexts[0].passages]
    question = qa.contexts[0].questions[0]
    methods = [make_method(model, tokenizer, f"blend@{r:g}", **blending(r)) for r in args.ratios]
    joiner = methods[0].lm
    assert joiner is not None
    warm = prompt_ids(joiner, passages, "-")
    ids = prompt_ids(joiner, [passages[i] for i in question.order], question.text)
    for method in methods:
        assert method.lm is not None
        method.lm.prefill(warm)
    timings: dict[str, list[float]] = {}
    floors: dict[str, list[float]] = {}
    for _ in range(args.reps):  # configurations take turns, repetition by repetition
        timings.setdefault("full", []).append(joiner.prefill(ids, use_cache=False).ttft_seconds)
        for method in methods:
            assert method.lm is not None
            prefill = method.lm.prefill(ids, store=False)
            timings.setdefault(method.name, []).append(prefill.ttft_seconds)
            floors.setdefault(method.name, []).append(floor_seconds(method.lm, ids, prefill))
    full = statistics.median(timings["full"])
    emit({"bench": "blend_ttft", "config": "full", "prompt_tokens": len(ids), "ttft_s": full, "reps": args.reps}, out)
    for method in methods:
        ttft, floor = statistics.median(timings[method.name]), statistics.median(floors[method.name])
        emit(
            {
                "bench": "blend_ttft",
                "config": method.name,
                "prompt_tokens": len(ids),
                "passages": args.passages,
                "passage_tokens": args.passage_tokens,
                "ttft_s": ttft,
                "floor_s": floor,
                "speedup_vs_full": full / ttft,
                "ratio_to_floor": ttft / floor,
                "reps": args.reps,
            },
            out,
        )
    if args.plot:
        plot_ttft(out)


def floor_seconds(lm: CachedCausalLM, ids: list[int], prefill: Any) -> float:
    """What blending this prompt cannot avoid, measured now: copying the loaded segments' bytes, and the model's
    layers over the tokens it computes (every token for the full layers, then the kept ones), with nothing else
    (no cache lookups, no key turning, no selection)."""
    assert lm.blender is not None
    n = len(ids)
    layout = lm.layout
    loaded = sum(prefill.tier_tokens.values())
    source = torch.empty(layout.chunk_shape(max(loaded, 1)))
    target = torch.empty_like(source)
    started = time.perf_counter()
    target.copy_(source)
    copy = time.perf_counter() - started
    config = lm.config
    reused = torch.zeros(n, dtype=torch.bool)
    for piece, hit in zip(prefill.segments, prefill.segment_hits, strict=True):
        if hit > 0:
            reused[max(piece.start, prefill.prefix_tokens) : piece.start + hit] = True
    kv = torch.zeros(layout.chunk_shape(n))
    ratio, check = config.blend_recompute_ratios, config.blend_check_layers
    started = time.perf_counter()
    lm.blender.run(torch.tensor(ids), kv, prefill.prefix_tokens, reused, ratio, check)
    return copy + time.perf_counter() - started


def _trim(tokenizer: Any, text: str, tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer.decode(ids[:tokens])


# -- plots --------------------------------------------------------------------------------------------------
def plot_quality(results: Path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in results.read_text().splitlines()]
    summary = {r["method"]: r for r in rows if r.get("bench") == "blend_quality_summary" and r["kind"] == "single"}
    ratios = sorted(float(m.split("@")[1]) for m in summary if m.startswith("blend@"))
    x = [0.0, *ratios, 1.0]
    names = ["reuse", *(f"blend@{r:g}" for r in ratios)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric, label in (
        (axes[0], "f1", "token F1"),
        (axes[1], "gold_logprob", "gold answer log-prob (nats)"),
        (axes[2], "kl_first_token", "KL(full || method), first token"),
    ):
        ys = [summary[n][metric] for n in names] + [summary["full"][metric] if metric != "kl_first_token" else 0.0]
        ax.plot(x, ys, marker="o", label="blending")
        ax.axhline(
            summary["full"][metric] if metric != "kl_first_token" else 0.0, color="k", ls="--", lw=1, label="full"
        )
        ax.axhline(summary["prefix"][metric], color="tab:red", ls=":", lw=1, label="prefix caching only")
        ax.set_xlabel("recompute ratio")
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Blending quality on SmolLM2-135M, {summary['full']['questions']} single-hop questions")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "img" / "blend_quality.svg")


def plot_ttft(results: Path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in results.read_text().splitlines() if '"blend_ttft"' in line]
    latest = {r["config"]: r for r in rows}
    names = ["full", *(n for n in latest if n != "full")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(names, [latest[n]["ttft_s"] for n in names], color=["tab:gray", *["tab:blue"] * (len(names) - 1)])
    for i, n in enumerate(names[1:], start=1):
        ax.plot([i - 0.4, i + 0.4], [latest[n]["floor_s"]] * 2, color="k", lw=2)
    ax.set_ylabel("TTFT (s)")
    prompt = latest[names[1]]
    ax.set_title(f"{prompt['passages']} passages x {prompt['passage_tokens']} tokens (black: floor)")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "img" / "blend_ttft.svg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["quality", "ttft"])
    parser.add_argument("--contexts", type=int, default=40)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.15, 0.3])
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--passage-tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--resume", action="store_true", help="quality: keep the contexts --out already holds in full")
    args = parser.parse_args()
    logging.getLogger("kvtier").setLevel(logging.WARNING)
    (run_quality if args.what == "quality" else run_ttft)(args)


if __name__ == "__main__":
    main()
