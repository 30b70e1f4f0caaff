"""kvtier as SGLang HiCache's L3 backend, built by SGLang's own storage backend factory (``dynamic``) from the real
``sglang`` package (0.5.23, installed without its CUDA dependencies: its engine does not run on this CPU).

SGLang's host pool class cannot be imported here (its module pulls in torchvision, a CUDA build), so the host pool
is a stand-in holding a real page_first buffer and SGLang 0.5.23's own pointer arithmetic for it
(``MHATokenToKVPoolHost.get_page_buffer_meta``: a K and a V block per page). What remains for a GPU machine:
``python -m sglang.launch_server`` with this backend end to end (``docs/sglang.md``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

pytest.importorskip("sglang.srt.mem_cache.hicache_storage", reason="sglang not installed (scripts/env.sh installs it)")

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from kvtier.integrations.sglang.hicache import KVTierHiCacheStorage

LAYERS, HEADS, HEAD_DIM, PAGE = 3, 2, 16, 8


class PageFirstHostPool:
    """A host KV pool in SGLang's ``page_first`` layout: ``kv_buffer[2, size, layers, heads, head_dim]``."""

    layout = "page_first"

    def __init__(self, pages: int, dtype: torch.dtype = torch.float16, seed: int = 0) -> None:
        self.layer_num, self.head_num, self.head_dim, self.page_size, self.dtype = LAYERS, HEADS, HEAD_DIM, PAGE, dtype
        self.size = pages * PAGE
        generator = torch.Generator().manual_seed(seed)
        self.kv_buffer = torch.randn(2, self.size, LAYERS, HEADS, HEAD_DIM, generator=generator).to(dtype)

    def get_page_buffer_meta(self, indices: torch.Tensor) -> tuple[list[int], list[int]]:
        item = self.dtype.itemsize
        v_offset = self.layer_num * self.size * self.head_num * self.head_dim * item
        ptrs = []
        for index in indices.tolist()[:: self.page_size]:
            k_ptr = self.kv_buffer.data_ptr() + index * self.layer_num * self.head_num * self.head_dim * item
            ptrs += [k_ptr, k_ptr + v_offset]
        size = self.layer_num * self.page_size * self.head_num * self.head_dim * item
        return ptrs, [size] * len(ptrs)

    def page(self, page: int) -> torch.Tensor:
        return self.kv_buffer[:, page * PAGE : (page + 1) * PAGE].clone()


def pages(*numbers: int) -> torch.Tensor:
    """Host indices of whole pages (SGLang passes token indices, page-aligned)."""
    return torch.cat([torch.arange(n * PAGE, (n + 1) * PAGE) for n in numbers])


def storage_config(tp_rank: int = 0, model: str = "org/model", **kvtier: object) -> HiCacheStorageConfig:
    extra = {"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang.hicache",
             "class_name": "KVTierHiCacheStorage", "kvtier": {"chunk_size": PAGE, **kvtier}}  # fmt: skip
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=True, model_name=model, extra_config=extra,
    )  # fmt: skip


@pytest.fixture
def make_backend() -> Iterator[Callable[..., KVTierHiCacheStorage]]:
    made: list[KVTierHiCacheStorage] = []

    def make(host: PageFirstHostPool, **config: object) -> KVTierHiCacheStorage:
        backend = StorageBackendFactory.create_backend("dynamic", storage_config(**config), host)
        assert isinstance(backend, KVTierHiCacheStorage)
        backend.register_mem_pool_host(host)  # as HiCacheController does after creating it
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def test_sglangs_factory_builds_it_and_pages_round_trip_bit_exact(make_backend) -> None:
    host = PageFirstHostPool(pages=8)
    backend = make_backend(host)
    keys = [f"page-hash-{i}" for i in range(4)]
    assert backend.batch_set_v1(keys, pages(0, 1, 2, 3)) == [True] * 4
    expected = [host.page(n) for n in range(4)]
    assert backend.batch_exists(keys) == 4
    assert backend.batch_get_v1(keys, pages(4, 5, 6, 7)) == [True] * 4  # into other host pages
    for n in range(4):
        assert torch.equal(host.page(4 + n).view(torch.int16), expected[n].view(torch.int16))


def test_batch_exists_counts_consecutive_pages_from_the_start(make_backend) -> None:
    host = PageFirstHostPool(pages=4)
    backend = make_backend(host)
    backend.batch_set_v1(["a", "b", "d"], pages(0, 1, 3))
    assert backend.batch_exists(["a", "b", "c", "d"]) == 2
    assert backend.batch_exists(["x", "a"]) == 0
    assert backend.batch_get_v1(["a", "b", "c", "d"], pages(0, 1, 2, 3)) == [True, True, False, False]


def test_another_rank_model_or_dtype_never_reads_these_pages(make_backend, tmp_path) -> None:
    shared = {"local_cpu": False, "local_disk": str(tmp_path), "max_local_disk_size": 0.1}
    writer = make_backend(PageFirstHostPool(pages=2), **shared)
    writer.batch_set_v1(["a", "b"], pages(0, 1))
    writer.storage.flush(10)
    assert make_backend(PageFirstHostPool(pages=2), **shared).batch_exists(["a", "b"]) == 2  # same everything: hit
    assert make_backend(PageFirstHostPool(pages=2), tp_rank=1, **shared).batch_exists(["a", "b"]) == 0
    assert make_backend(PageFirstHostPool(pages=2), model="org/other", **shared).batch_exists(["a", "b"]) == 0
    other_dtype = make_backend(PageFirstHostPool(pages=2, dtype=torch.bfloat16), **shared)
    assert other_dtype.batch_exists(["a", "b"]) == 0


def test_two_instances_share_pages_through_a_kvtier_server(make_backend, thread_server) -> None:
    server = thread_server(chunk_size=PAGE)
    remote = {"remote_url": f"kvtier://127.0.0.1:{server.port}", "local_cpu": False}
    first, second = PageFirstHostPool(pages=4, seed=1), PageFirstHostPool(pages=4, seed=2)
    a, b = make_backend(first, **remote), make_backend(second, **remote)
    assert a.batch_set_v1(["p0", "p1", "p2"], pages(0, 1, 2)) == [True] * 3
    a.storage.flush(10)
    assert b.batch_exists(["p0", "p1", "p2", "p3"]) == 3
    assert b.batch_get_v1(["p0", "p1", "p2"], pages(1, 2, 3)) == [True] * 3
    for n in range(3):
        assert torch.equal(second.page(n + 1).view(torch.int16), first.page(n).view(torch.int16))


def test_the_tensor_interface_round_trips(make_backend) -> None:
    host = PageFirstHostPool(pages=2)
    backend = make_backend(host)
    page = host.page(0)
    assert backend.set("t", page) and backend.exists("t") and not backend.exists("u")
    target = torch.zeros_like(page)
    assert backend.get("t", target) is target and torch.equal(target.view(torch.int16), page.view(torch.int16))
    assert backend.get("u", torch.zeros_like(page)) is None


def test_indices_that_are_not_whole_pages_transfer_nothing(make_backend, caplog) -> None:
    """Host indices that do not match the keys (too few pages, or none): no page written or read, no exception
    into SGLang's cache controller, a warning."""
    host = PageFirstHostPool(pages=4)
    backend = make_backend(host)
    before = host.kv_buffer.clone()
    assert backend.batch_set_v1(["a", "b"], pages(0)) == [False, False]
    assert backend.batch_exists(["a"]) == 0
    assert backend.batch_set_v1(["a"], pages(0)) == [True]
    assert backend.batch_get_v1(["a", "b", "c"], pages(1, 2)) == [False, False, False]
    assert backend.batch_get_v1(["a"], torch.tensor([], dtype=torch.int64)) == [False]
    assert torch.equal(host.kv_buffer.view(torch.int16), before.view(torch.int16))
    assert "not transferred" in caplog.text
