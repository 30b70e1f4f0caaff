"""Gather/scatter between paged KV layouts and kvtier's (layers, kv, tokens, heads, head_dim) tensor, against a
per-token reference. Runs on the CPU, and also on CUDA when there is one."""

from __future__ import annotations

import pytest
import torch

from kvtier.integrations.vllm.layouts import (
    PagedKV,
    PagedLayout,
    PagedTransfer,
    blocks_of,
    key_value_views,
    slot_mapping,
)

LAYERS, HEADS, HEAD_DIM, BLOCKS = 3, 2, 8, 12
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def make_layer(layout: PagedLayout, block_size: int, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if layout is PagedLayout.KV_FIRST:
        shape: tuple[int, ...] = (2, BLOCKS, block_size, HEADS, HEAD_DIM)
    else:
        shape = (BLOCKS, HEADS, block_size, 2 * HEAD_DIM)
    return torch.randn(shape, device=device).to(dtype)


def reference_kv(layer: torch.Tensor, layout: PagedLayout, slot: int, block_size: int) -> torch.Tensor:
    """K and V ``(2, heads, head_dim)`` of one slot, read the way each backend's kernels read it."""
    block, offset = divmod(slot, block_size)
    if layout is PagedLayout.KV_FIRST:
        return layer[:, block, offset]
    if layout is PagedLayout.CPU_PLANES:  # per block and head: keys dimension-major, then values token-major
        planes = layer.reshape(BLOCKS, HEADS, 2, block_size * HEAD_DIM)
        keys = planes[block, :, 0, torch.arange(HEAD_DIM) * block_size + offset]  # (heads, head_dim)
        values = planes[block, :, 1, offset * HEAD_DIM : (offset + 1) * HEAD_DIM]
        return torch.stack([keys, values])
    key_cache, value_cache = layer.transpose(1, 2).split(HEAD_DIM, dim=-1)  # flash_attn.py
    return torch.stack([key_cache[block, offset], value_cache[block, offset]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(PagedLayout))
@pytest.mark.parametrize(
    ("block_size", "block_ids", "start", "end"),
    [
        (16, [7, 2, 9, 0], 0, 64),  # non-contiguous, whole blocks
        (16, [7, 2, 9, 0], 5, 51),  # partial first and last block
        (16, [11, 3, 5], 16, 37),  # starting on a block boundary, ending inside one
        (32, [4, 1], 0, 1),  # a single token
    ],
)
def test_gather_and_scatter_match_per_token_reference(
    device: str, layout: PagedLayout, block_size: int, block_ids: list[int], start: int, end: int
) -> None:
    layers = [make_layer(layout, block_size, device) for _ in range(LAYERS)]
    paged = PagedKV.from_layers(layers, layout)
    slots = slot_mapping(block_ids, block_size, start, end)

    gathered = torch.empty(paged.staging_shape(end - start), device=device)
    paged.gather(slots, gathered)
    for i, slot in enumerate(slots.tolist()):
        for layer in range(LAYERS):
            assert torch.equal(gathered[layer, :, i], reference_kv(layers[layer], layout, slot, block_size))

    fresh = torch.randn_like(gathered)
    before = [layer.clone() for layer in layers]
    paged.scatter(slots, fresh)
    touched = set(slots.tolist())
    for layer in range(LAYERS):
        for slot in range(BLOCKS * block_size):
            expected = fresh[layer, :, slots.tolist().index(slot)] if slot in touched else None
            got = reference_kv(layers[layer], layout, slot, block_size)
            if expected is None:  # every other slot is left alone
                assert torch.equal(got, reference_kv(before[layer], layout, slot, block_size))
            else:
                assert torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(PagedLayout))
def test_transfer_round_trip_through_host(device: str, layout: PagedLayout) -> None:
    """Host staging (pinned, on its own stream on CUDA) of a range that does not start at token 0."""
    block_size, block_ids, start, end = 16, [5, 8, 1, 10, 3], 19, 77
    layers = [make_layer(layout, block_size, device, torch.float16) for _ in range(LAYERS)]
    src = PagedKV.from_layers(layers, layout)
    dst = PagedKV.from_layers([torch.zeros_like(layer) for layer in layers], layout)
    slots = slot_mapping(block_ids, block_size, start, end)
    out = PagedTransfer(src)
    host = out.host_tensor(end)
    assert host.device.type == "cpu" and host.is_pinned() == (device == "cuda")
    out.gather_to_host(slots, host, start)
    PagedTransfer(dst).scatter_from_host(slots, host, start)
    if device == "cuda":
        torch.cuda.synchronize()
    blocks, offsets = (slots // block_size).to(device), (slots % block_size).to(device)
    for s, d in zip([*src.keys, *src.values], [*dst.keys, *dst.values], strict=True):
        assert torch.equal(s[blocks, offsets], d[blocks, offsets])


def test_strided_content_split_view_as_vllm_allocates_it() -> None:
    """vLLM 0.32 may give token-major (LBNHC) memory behind a [B, H, N, C] view: the view follows the strides."""
    block_size = 16
    physical = torch.randn(BLOCKS, block_size, HEADS, 2 * HEAD_DIM)
    layer = physical.permute(0, 2, 1, 3)  # logical [B, H, N, C], not contiguous
    paged = PagedKV.from_layers([layer], PagedLayout.CONTENT_SPLIT)
    slots = slot_mapping([3, 6], block_size, 4, 30)
    out = torch.empty(paged.staging_shape(len(slots)))
    paged.gather(slots, out)
    for i, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, block_size)
        assert torch.equal(out[0, 0, i], physical[block, offset, :, :HEAD_DIM])
        assert torch.equal(out[0, 1, i], physical[block, offset, :, HEAD_DIM:])


def test_kernel_blocks_smaller_than_scheduler_blocks() -> None:
    """vLLM may split a scheduler block into kernel blocks; slots computed with the scheduler's size still land."""
    kernel, scheduler = 16, 64
    layer = make_layer(PagedLayout.CPU_PLANES, kernel, "cpu")  # BLOCKS kernel blocks = BLOCKS / 4 scheduler ones
    paged = PagedKV.from_layers([layer], PagedLayout.CPU_PLANES)
    slots = slot_mapping([2, 0], scheduler, 10, 100)
    out = torch.empty(paged.staging_shape(len(slots)))
    paged.gather(slots, out)
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(out[0, :, i], reference_kv(layer, PagedLayout.CPU_PLANES, slot, kernel))


def test_slot_mapping_and_blocks_of() -> None:
    assert slot_mapping([4, 1], 4, 2, 7).tolist() == [18, 19, 4, 5, 6]
    assert blocks_of([4, 1, 9], 4, 3, 5) == {4, 1}
    assert blocks_of([4, 1, 9], 4, 8, 8) == set()
    with pytest.raises(ValueError, match="do not fit"):
        slot_mapping([4], 4, 0, 5)


def test_layout_shape_errors() -> None:
    with pytest.raises(ValueError, match="kv-first"):
        key_value_views(torch.zeros(3, 4, 16, 2, 8), PagedLayout.KV_FIRST)
    with pytest.raises(ValueError, match="cpu-planes"):
        key_value_views(torch.zeros(4, 2, 16, 7), PagedLayout.CPU_PLANES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_planes_read_what_vllms_own_cpu_kernel_wrote(dtype: torch.dtype) -> None:
    """Not a reading of the layout's description: vLLM's own cache-write kernel writes known K and V into a
    block, kvtier's gather must give them back (it once read the keys token-major: a consistent round trip for
    kvtier, but not the model's keys)."""
    pytest.importorskip("vllm")
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kvtier.integrations.vllm.compat import check_cpu_planes

    block_size, heads, head_dim = 32, 2, 64
    layer = torch.zeros(2, heads, block_size, 2 * head_dim, dtype=dtype)
    check_cpu_planes(layer)
    key_cache, value_cache = layer.view(2, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    k, v = torch.randn(40, heads, head_dim).to(dtype), torch.randn(40, heads, head_dim).to(dtype)
    slots = slot_mapping([1, 0], block_size, 0, 40)
    isa = _get_attn_isa(dtype, block_size, head_dim)
    ops.cpu_attn_reshape_and_cache(
        k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
    )
    out = torch.empty(1, 2, 40, heads, head_dim, dtype=dtype)
    PagedKV.from_layers([layer], PagedLayout.CPU_PLANES).gather(slots, out)
    assert torch.equal(out[0, 0], k) and torch.equal(out[0, 1], v)
