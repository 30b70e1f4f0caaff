"""Gather/scatter speed between vLLM's paged KV and kvtier's host tensor, against a plain copy of the same bytes.

    python benchmarks/bench_vllm_layouts.py --device cuda   # or cpu

For each layout, KV of ``--tokens`` tokens spread over shuffled blocks is gathered from the paged cache into a
(page-locked, on CUDA) host tensor and scattered back, through :class:`PagedTransfer` (on CUDA: its own stream);
``copy_d2h`` / ``copy_h2d`` are one contiguous ``copy_`` of the same number of bytes between the same kinds of
memory, measured in the same run: the ceiling a gather/scatter can approach. One JSON line per layout.
"""

from __future__ import annotations

import argparse

import torch

from kvtier.integrations.vllm.layouts import PagedKV, PagedLayout, PagedTransfer, slot_mapping

from common import emit, summary, timed

# name: (layers, kv_heads, head_dim, dtype, block_size, layout) on each device
SHAPES = {
    "cpu": ("smollm2-135m fp32, vLLM CPU", 30, 3, 64, torch.float32, 128, PagedLayout.CPU_PLANES),
    "cuda": ("llama-8b fp16, FlashAttention", 32, 8, 128, torch.float16, 16, PagedLayout.CONTENT_SPLIT),
}


def layer_tensor(layout: PagedLayout, blocks: int, block_size: int, heads: int, head_dim: int, **kw) -> torch.Tensor:
    if layout is PagedLayout.KV_FIRST:
        return torch.randn(2, blocks, block_size, heads, head_dim, **kw)
    return torch.randn(blocks, heads, block_size, 2 * head_dim, **kw)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    name, layers, heads, head_dim, dtype, block_size, native = SHAPES[args.device]
    blocks_needed = -(-args.tokens // block_size)
    num_blocks = 2 * blocks_needed
    block_ids = torch.randperm(num_blocks)[:blocks_needed].tolist()  # scattered, as in a long-running server
    slots = slot_mapping(block_ids, block_size, 0, args.tokens)
    layouts = [native] + [layout for layout in PagedLayout if layout is not native]
    for layout in layouts:
        kv = [
            layer_tensor(layout, num_blocks, block_size, heads, head_dim, dtype=dtype, device=args.device)
            for _ in range(layers)
        ]
        transfer = PagedTransfer(PagedKV.from_layers(kv, layout))
        host = transfer.host_tensor(args.tokens)
        nbytes = host.numel() * host.element_size()
        device_copy = torch.empty(host.shape, dtype=dtype, device=args.device)
        plain_host = torch.empty(host.shape, dtype=dtype, pin_memory=args.device == "cuda")

        def d2h(src: torch.Tensor = device_copy, dst: torch.Tensor = plain_host) -> None:
            dst.copy_(src, non_blocking=True)
            sync(args.device)

        def h2d(src: torch.Tensor = plain_host, dst: torch.Tensor = device_copy) -> None:
            dst.copy_(src, non_blocking=True)
            sync(args.device)

        def gather(transfer: PagedTransfer = transfer, host: torch.Tensor = host) -> None:
            transfer.gather_to_host(slots, host, 0)

        def scatter(transfer: PagedTransfer = transfer, host: torch.Tensor = host) -> None:
            transfer.scatter_from_host(slots, host, 0)
            sync(args.device)

        record = {"bench": "vllm_layouts", "device": args.device, "shape": name, "layout": layout.value}
        record |= {"tokens": args.tokens, "block_size": block_size, "mib": round(nbytes / 2**20, 1)}
        for op, fn in (("gather", gather), ("copy_d2h", d2h), ("scatter", scatter), ("copy_h2d", h2d)):
            stats = summary(timed(fn, args.reps), nbytes)
            record[f"{op}_ms"] = round(1000 * stats["median_s"], 2)
            record[f"{op}_gbps"] = round(stats["gbps"], 2)
        emit(record)


if __name__ == "__main__":
    main()
