"""Runs a real vLLM engine (SmolLM2 fp32 on the CPU) through a list of phases and prints one JSON line per phase.

    python driver.py SPEC.json

SPEC: ``{"connector": {"kv_role": ..., "extra": {...}} | null, "prefix_caching": bool, "max_model_len": int,
"max_num_seqs": int, "num_blocks": int | null, "phases": [...]}``. A phase is one of

- ``{"name", "prompts": [[token ids]], "max_tokens", "cache_salt"?}``: one ``generate`` call (all prompts at once,
  under vLLM's ``cache_salt`` when given); prints the greedy token ids, their logprobs and the wall time;
- ``{"name", "pause": true}``: prints ``{"pause": name}`` and waits for a line on stdin (the test acts meanwhile,
  e.g. stops the kvtier server);
- ``{"name", "abort": [[token ids]], "steps"}``: adds the prompts, runs ``steps`` engine steps, aborts them all;
- ``{"name", "state": true}``: prints what the scheduler-side connector still holds (must be nothing when idle);
- ``{"name", "follow_up": PHASE, "append": [token ids], "max_tokens"}``: a conversation's next turn: generates from
  each of PHASE's prompts followed by its output and ``append``.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the ``state`` phase can look at the
scheduler's connector; the worker is still its own process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def build_llm(spec: dict[str, Any]) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from kvtier.integrations.models import model_path

    kwargs: dict[str, Any] = {}
    if spec.get("connector"):
        connector = spec["connector"]
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.integrations.vllm",
            kv_role=connector.get("kv_role", "kv_both"),
            kv_connector_extra_config=connector.get("extra", {}),
        )
    if spec.get("num_blocks"):
        kwargs["num_gpu_blocks_override"] = spec["num_blocks"]
    return LLM(
        model=str(model_path()),
        dtype="float32",
        enforce_eager=True,
        max_model_len=spec.get("max_model_len", 2048),
        max_num_seqs=spec.get("max_num_seqs", 4),
        enable_prefix_caching=spec.get("prefix_caching", False),
        seed=0,
        **kwargs,
    )


def generate(llm: Any, phase: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=phase.get("max_tokens", 4), logprobs=0)
    started = time.perf_counter()
    salt = {"cache_salt": phase["cache_salt"]} if "cache_salt" in phase else {}
    outputs = llm.generate([{"prompt_token_ids": p, **salt} for p in phase["prompts"]], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    drain(llm)
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [[round(next(iter(step.values())).logprob, 4) for step in o.outputs[0].logprobs] for o in outputs],
        "seconds": round(seconds, 3),
    }


def drain(llm: Any) -> None:
    """Step the engine until no finished request holds blocks (``generate`` returns before a decode store's step:
    the next phase must find it stored)."""
    engine = llm.llm_engine
    for _ in range(100):
        if not engine.engine_core.engine_core.scheduler.has_requests():
            return
        engine.step()
    raise RuntimeError("finished requests still hold their blocks after 100 engine steps")


def abort(llm: Any, phase: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    engine = llm.llm_engine
    ids = [f"abort-{phase['name']}-{i}" for i in range(len(phase["abort"]))]
    for req_id, prompt in zip(ids, phase["abort"], strict=True):
        engine.add_request(req_id, {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=64))
    for _ in range(phase.get("steps", 1)):
        engine.step()
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return {"aborted": len(ids)}


def connector_state(llm: Any) -> dict[str, Any]:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    side = scheduler.connector._scheduler
    held = sum(map(len, (side._admitted, side._expected, side._handoffs, side._due_loads, side._decode_from)))
    held += len(side._decode_stores)
    return {"hits": len(side._matches), "admitted": held, "requests": len(scheduler.requests)}


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    llm = build_llm(spec)
    generated: dict[str, tuple[list[list[int]], list[list[int]]]] = {}  # phase: (prompts, outputs)
    for phase in spec["phases"]:
        if "follow_up" in phase:
            prompts, outputs = generated[phase["follow_up"]]
            phase = {**phase, "prompts": [p + out + phase["append"] for p, out in zip(prompts, outputs, strict=True)]}
        if phase.get("pause"):
            print(json.dumps({"pause": phase["name"]}), flush=True)
            sys.stdin.readline()
            continue
        if "abort" in phase:
            result = abort(llm, phase)
        elif phase.get("state"):
            result = connector_state(llm)
        else:
            result = generate(llm, phase)
            generated[phase["name"]] = (phase["prompts"], result["tokens"])
        print(json.dumps({"phase": phase["name"], **result}), flush=True)


if __name__ == "__main__":
    main()
