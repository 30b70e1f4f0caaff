"""CUDA paths: KV stored from and retrieved into GPU tensors, with and without a page-locked arena.

Skipped without a CUDA device; run on a GPU machine (see docs/benchmarks.md for the recorded run).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from kvtier import CacheEngine, KVLayout, load_config  # noqa: E402


@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_round_trip_is_bit_exact(tmp_path, pinned: bool, dtype: str) -> None:
    """A prompt's KV stored from a CUDA tensor comes back into another CUDA tensor bit for bit,
    from memory and from disk."""
    layout = KVLayout(4, 2, 64, dtype)
    config = load_config(
        env={},
        overrides={
            "chunk_size": 16,
            "max_local_cpu_size": 0.01,
            "pin_local_cpu": pinned,
            "local_disk": str(tmp_path),
            "max_local_disk_size": 0.05,
        },
    )
    tokens = list(range(1000, 1100))
    kv = torch.randn(layout.chunk_shape(100), device="cuda").to(getattr(torch, dtype))
    with CacheEngine(config, layout, model_name="cuda-test") as engine:
        assert engine.store(tokens, kv).stored_tokens == 96
        out = torch.zeros_like(kv)
        result = engine.retrieve(tokens, out=out)
        assert result.hit_tokens == 96
        assert torch.equal(out[:, :, :96].view(torch.int16), kv[:, :, :96].view(torch.int16))
        engine.flush()
        engine.storage.memory.clear()
        out.zero_()
        assert engine.retrieve(tokens, out=out).tier_tokens == {"disk": 96}
        assert torch.equal(out[:, :, :96].view(torch.int16), kv[:, :, :96].view(torch.int16))


def test_pinned_arena_gives_pinned_chunk_tensors() -> None:
    """With pin_local_cpu the chunks' torch views are page-locked (so host-to-device copies are async DMA)."""
    layout = KVLayout(2, 2, 8)
    config = load_config(env={}, overrides={"chunk_size": 4, "max_local_cpu_size": 0.001, "pin_local_cpu": True})
    with CacheEngine(config, layout, model_name="cuda-test") as engine:
        obj = engine.storage.allocate(layout, 4)
        assert obj is not None
        assert obj.tensor().is_pinned()
        obj.unref()
