"""What the remote tiers' tests share: a configuration under a key prefix of its own, a small KV layout and its
data, a tier factory fixture that clears and closes what it made, and an engine in another process (to prove
that chunks stored by one process are read by another)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from kvtier import CacheEngine, KVLayout, load_config
from kvtier.config import KVTierConfig
from kvtier.metrics import CacheMetrics
from kvtier.storage.registry import create_remote_tier
from kvtier.storage.remote import RemoteTier

LAYOUT = KVLayout(2, 2, 16)  # 256 bytes per token: a 16-token chunk is 4 KiB
CHUNK = 16


def config(url: str, **overrides: object) -> KVTierConfig:
    """A configuration with its own key prefix, so tests sharing a server never see each other's chunks."""
    values = {"remote_url": url, "remote_prefix": f"test-{uuid.uuid4().hex[:12]}", "remote_timeout_sec": 5.0}
    return load_config(env={}, overrides={**values, **overrides})


def engine_config(url: str, **overrides: object) -> KVTierConfig:
    return config(url, chunk_size=CHUNK, max_local_cpu_size=0.01, **overrides)


def random_kv(tokens: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(LAYOUT.chunk_shape(tokens)).astype(np.float16)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


@pytest.fixture
def make_tier(metrics: CacheMetrics) -> Iterator[Callable[..., RemoteTier]]:
    """``make_tier(url, **config)``: the tier for ``url``'s scheme under a fresh prefix, cleared and closed after
    the test."""
    made: list[RemoteTier] = []

    def make(url: str, **overrides: object) -> RemoteTier:
        tier = create_remote_tier(url, config(url, **overrides), metrics)
        assert isinstance(tier, RemoteTier)
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.clear()
        tier.close()


_ENGINE_PROCESS = """
import sys
import numpy as np
from kvtier import CacheEngine, KVLayout, load_config

url, prefix, action = sys.argv[1:]
config = load_config(env={{}}, overrides={{"remote_url": url, "remote_prefix": prefix, "chunk_size": {chunk},
                                          "max_local_cpu_size": 0.01}})
layout = KVLayout(2, 2, 16)
tokens = list(range(1000, 1080))
kv = np.random.default_rng(7).standard_normal(layout.chunk_shape(80)).astype(np.float16)
with CacheEngine(config, layout, model_name="shared") as engine:
    if action == "store":
        print(engine.store(tokens, kv).stored_tokens, engine.flush(10))
    else:
        got = engine.retrieve(tokens)
        print(got.hit_tokens, got.tier_tokens, np.array_equal(got.kv.view(np.uint16), kv.view(np.uint16)))
"""


def engine_process(url: str, prefix: str, action: str, timeout: float = 120) -> str:
    """Run an engine in a new process: ``store`` an 80-token prompt (prints ``80 True``) or ``retrieve`` it
    (prints the hit tokens, the tiers they came from and whether the KV is bit-exact)."""
    args = [sys.executable, "-c", _ENGINE_PROCESS.format(chunk=CHUNK), url, prefix, action]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def fault_engine(url: str, timeout: float = 0.5) -> CacheEngine:
    """An engine for fault tests: memory only stages (every hit comes from the remote tier), short timeouts, a
    breaker that opens after two failures and probes again after half a second."""
    cfg = engine_config(url, local_cpu=False, remote_timeout_sec=timeout, remote_circuit_failures=2,
                        remote_circuit_cooldown_sec=0.5)  # fmt: skip
    return CacheEngine(cfg, LAYOUT, model_name="faults")


def store_and_read_back(engine: CacheEngine, tier_name: str, tokens: int = 64) -> tuple[list[int], np.ndarray]:
    """Store a prompt until written and read it back from ``tier_name``, bit-exact; the prompt and its KV."""
    ids, kv = list(range(tokens)), random_kv(tokens)
    assert engine.store(ids, kv).stored_tokens == tokens and engine.flush(10)
    got = engine.retrieve(ids)
    assert got.tier_tokens == {tier_name: tokens} and same_bits(got.kv, kv)
    return ids, kv


def count_held(tier: RemoteTier, keys: list, allocate, content) -> int:  # type: ignore[type-arg, no-untyped-def]
    """How many of ``keys`` the tier still holds, read one at a time (a small pool holds few large chunks), each
    asserted bit-exact: a store that evicted or refused chunks must lose them to misses, never to wrong bytes."""
    held = 0
    for key in keys:
        obj = tier.get(key, allocate)
        if obj is not None:
            held += 1
            np.testing.assert_array_equal(obj.data, content(key.id, obj.nbytes))
            obj.unref()
    return held
