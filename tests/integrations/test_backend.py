"""The cache as integrations see it: in-process engine or server, same calls, and failures become misses."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier import KVLayout, load_config  # noqa: E402
from kvtier.integrations.backend import InProcessBackend, ServerBackend, as_numpy, open_backend  # noqa: E402

LAYOUT = KVLayout(2, 2, 8, "bfloat16")
CHUNK = 16


def config(**overrides: Any) -> Any:
    return load_config(env={}, overrides={"chunk_size": CHUNK, "max_local_cpu_size": 0.05, **overrides})


def random_kv(num_tokens: int, seed: int = 0) -> Any:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.chunk_shape(num_tokens), generator=generator).to(torch.bfloat16)


@pytest.fixture(params=["in-process", "server"])
def backend(request: pytest.FixtureRequest, thread_server: Any) -> Any:
    overrides = {"server_url": thread_server().url} if request.param == "server" else {}
    opened = open_backend(config(**overrides), LAYOUT, model_name="m")
    assert opened.kind == request.param
    yield opened
    opened.close()


def test_store_lookup_retrieve_round_trip(backend: Any) -> None:
    tokens = np.arange(CHUNK * 3 + 5)
    kv = random_kv(len(tokens))
    assert backend.lookup(tokens) == 0
    assert backend.store(tokens, kv) == CHUNK * 3  # the trailing partial chunk is not stored
    assert backend.lookup(tokens) == CHUNK * 3
    out = torch.zeros_like(kv)
    loaded = backend.retrieve(tokens, out)
    assert (loaded.loaded_end, loaded.loaded_tokens, loaded.tier_tokens) == (
        CHUNK * 3,
        CHUNK * 3,
        {"memory": CHUNK * 3},
    )
    assert torch.equal(out[:, :, : CHUNK * 3].view(torch.int16), kv[:, :, : CHUNK * 3].view(torch.int16))
    assert not out[:, :, CHUNK * 3 :].any()


def test_retrieve_skips_what_the_caller_has_and_fits_the_buffer(backend: Any) -> None:
    tokens = np.arange(CHUNK * 4)
    kv = random_kv(len(tokens), seed=1)
    backend.store(tokens, kv)
    out = torch.full_like(kv[:, :, : CHUNK * 3], 7.0)  # room for three chunks only
    loaded = backend.retrieve(tokens, out, skip_tokens=CHUNK)
    assert (loaded.loaded_end, loaded.loaded_tokens) == (CHUNK * 3, CHUNK * 2)
    assert (out[:, :, :CHUNK] == 7.0).all()  # the skipped part is left alone
    assert torch.equal(out[:, :, CHUNK:].view(torch.int16), kv[:, :, CHUNK : CHUNK * 3].view(torch.int16))


def test_store_with_skip_reads_only_new_tokens(backend: Any) -> None:
    tokens = np.arange(CHUNK * 2)
    kv = random_kv(len(tokens), seed=2)
    backend.store(tokens[:CHUNK], kv[:, :, :CHUNK])
    kv_tail_only = kv.clone()
    kv_tail_only[:, :, :CHUNK] = float("nan")  # must not be read: the caller says the head is cached
    assert backend.store(tokens, kv_tail_only, skip_tokens=CHUNK) == CHUNK
    out = torch.zeros_like(kv)
    backend.retrieve(tokens, out)
    assert torch.equal(out.view(torch.int16), kv.view(torch.int16))


def test_skip_tokens_must_be_whole_chunks(backend: Any) -> None:
    tokens = np.arange(CHUNK * 2)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        backend.retrieve(tokens, random_kv(len(tokens)), skip_tokens=3)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        backend.store(tokens, random_kv(len(tokens)), skip_tokens=3)


def test_an_unreachable_server_is_a_miss_not_an_error(caplog: pytest.LogCaptureFixture, thread_server: Any) -> None:
    server = thread_server()
    server.stop()
    backend = ServerBackend(config(server_url=server.url, server_timeout_sec=0.2), LAYOUT, model_name="m")
    tokens = np.arange(CHUNK * 2)
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        assert backend.lookup(tokens) == 0
        assert backend.store(tokens, random_kv(len(tokens))) == 0
        assert backend.retrieve(tokens, random_kv(len(tokens))).loaded_end == 0
    assert backend.metrics.backend_errors.total() == 3
    assert len([r for r in caplog.records if "treating it as a miss" in r.message]) == 1  # rate-limited
    backend.close()


def test_in_process_is_the_default_and_closes_its_engine() -> None:
    backend = open_backend(config(), LAYOUT, model_name="m")
    assert isinstance(backend, InProcessBackend)
    backend.close()
    backend.close()  # idempotent


def test_as_numpy_views_bf16_as_uint16_without_copying() -> None:
    kv = random_kv(4)
    view = as_numpy(kv)
    assert view.dtype == np.uint16
    assert view.ctypes.data == kv.data_ptr()
