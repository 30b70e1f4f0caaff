"""``kvtier demo``: the two-request check. A long prompt, then the same prompt extended: the first request stores
its KV, the second retrieves it and computes only the new tokens; both TTFTs are shown.

Runs the real SmolLM2-135M-Instruct through transformers, with an in-process engine by default or against a
running ``kvtier server`` with ``--server-url tcp://127.0.0.1:5555``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from kvtier.config import KVTierConfig
from kvtier.engine.results import describe_tiers
from kvtier.errors import KVTierError

# A made-up operations manual: long, varied, and with facts to ask about.
CITIES = ["Lisbon", "Osaka", "Nairobi", "Quito", "Tallinn", "Perth", "Dakar", "Montreal", "Hanoi", "Bergen"]
GOODS = ["copper wire", "rice", "bicycle parts", "coffee", "solar panels", "wool", "glass", "tea", "paper", "salt"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context-tokens", type=int, default=2000, help="approximate length of the shared context")
    parser.add_argument("--max-new-tokens", type=int, default=24)


def run(args: argparse.Namespace, config: KVTierConfig) -> int:
    import torch
    from transformers import AutoTokenizer

    from kvtier.integrations.models import prepare_model
    from kvtier.integrations.transformers import CachedCausalLM

    torch.manual_seed(0)
    config = with_server_chunk_size(config, "demo")
    path = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with CachedCausalLM.from_pretrained(str(path), config=config) as lm:
        where = f"the kvtier server at {config.server_url}" if config.server_url else "an in-process kvtier engine"
        print(f"\nkvtier demo: {path.name} (fp32, {torch.get_num_threads()} threads) with {where}\n")
        manual = _manual(tokenizer, args.context_tokens)
        first = [
            {"role": "system", "content": "You answer questions about the shipping manual below.\n\n" + manual},
            {"role": "user", "content": "Which city ships copper wire?"},
        ]
        ids = tokenizer.apply_chat_template(first, add_generation_prompt=True, tokenize=True, return_dict=False)
        one = lm.generate(ids, args.max_new_tokens)
        answer = tokenizer.decode(one.token_ids, skip_special_tokens=True).strip()
        _report(1, "a long prompt", one, answer)
        second = [
            *first,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And which city ships tea?"},
        ]
        ids = tokenizer.apply_chat_template(second, add_generation_prompt=True, tokenize=True, return_dict=False)
        two = lm.generate(ids, args.max_new_tokens)
        _report(2, "the same prompt extended", two, tokenizer.decode(two.token_ids, skip_special_tokens=True).strip())
    speedup = one.prefill.ttft_seconds / two.prefill.ttft_seconds
    print(f"TTFT {one.prefill.ttft_seconds * 1e3:.0f} ms -> {two.prefill.ttft_seconds * 1e3:.0f} ms ({speedup:.1f}x)")
    return 0 if two.prefill.reused_tokens > 0 else 1


def with_server_chunk_size(config: KVTierConfig, command: str) -> KVTierConfig:
    """Against a server, use its chunk size (every client of a server must; the demo's own default is 64)."""
    if not config.server_url:
        return config
    from kvtier.client.client import Connection

    connection = Connection(
        config.server_url, timeout=config.server_timeout_sec, retries=1, auth_token=config.auth_token()
    )
    try:
        chunk_size = int(connection.ping()["chunk_size"])
    except KVTierError as exc:
        print(f"kvtier {command}: the server at {config.server_url} does not answer ({exc}); every request will miss")
        return config
    finally:
        connection.close()
    return dataclasses.replace(config, chunk_size=chunk_size)


def _manual(tokenizer, target_tokens: int) -> str:
    lines, i = [], 0
    while len(tokenizer("\n".join(lines))["input_ids"]) < target_tokens:
        city, goods = CITIES[i % len(CITIES)], GOODS[(i * 3 + i // len(CITIES)) % len(GOODS)]
        lines.append(
            f"Rule {i + 1}: the depot in {city} ships {goods} on day {i % 7 + 1} of each week, "
            f"in crates of {(i * 37) % 90 + 10} kg, checked by team {chr(65 + i % 26)}."
        )
        i += 1
    return "\n".join(lines)


def _report(number: int, what: str, generation, answer: str) -> None:
    p = generation.prefill
    print(f"Request {number}: {what}, {p.prompt_tokens} prompt tokens")
    if p.reused_tokens:
        tiers = describe_tiers(p.tier_tokens)
        print(f"  Retrieved {p.reused_tokens} tokens ({tiers}) in {p.load_seconds * 1e3:.1f} ms")
    else:
        print("  No cached prefix: computed the whole prompt")
    print(f"  Computed {p.computed_tokens} tokens in {p.forward_seconds * 1e3:.0f} ms")
    print(f"  TTFT {p.ttft_seconds * 1e3:.0f} ms")
    if p.stored_tokens:
        print(f"  Stored {p.stored_tokens} tokens in {p.store_seconds * 1e3:.1f} ms (after the first token)")
    print(f"  Answer: {answer!r}\n")
