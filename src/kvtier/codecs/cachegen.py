"""CacheGen-style lossy coding (LMCache's ``cachegen`` serde, SIGCOMM 2024): KV quantized per (layer, K/V,
channel) with more bins for early layers, then entropy-coded.

- **Quantization.** Each channel (one of ``kv_heads x head_dim``) of each layer's keys and values gets its own
  scale over the chunk's tokens (absmax / (bins / 2)): a channel's values share a range, which per-token vectors
  do not (keys have outlier channels that widen every vector's range: int4 per vector fails the quality gate on
  SmolLM2 where this passes). Early layers matter more: keys of the first third of the layers and values of the
  first two get twice the bins of the rest, as in CacheGen.
- **Entropy coding.** The symbols, in the payload's own order (layer, K/V, token, channel), go through Zstandard
  level 1 via C-Blosc2, whose Huffman/FSE stage codes each block of ~128 KiB (a few hundred tokens of one layer's
  keys or values) with the block's own statistics. Measured on SmolLM2's KV (``docs/compression.md``): ideal
  per-(layer, channel) models would take 10-17 % fewer bits, a per-(layer, K/V) range coder (constriction) 7 %
  fewer, but those decode at 50 M symbols/s here against 1.9-4 G for Blosc2's: at that speed a compressed read
  would be slower than a raw one from every store on this machine. Channel-major order (each channel's tokens
  together) coded 1 % worse and costs a transpose each way.
- **No anchor deltas.** CacheGen codes most tokens as deltas against anchor tokens; on SmolLM2's KV the deltas
  (groups of 10 tokens) had more entropy, not less (3.54 against 3.36 bits per symbol at equal error), so this
  codec quantizes values directly.

Encoded form: bins per (layer, K/V) (u8), scales per (layer, K/V, channel) (fp16), then one Blosc2 frame of the
u8 symbols in (layer, K/V, token, channel) order. ``cachegen`` uses LMCache's bins (keys 32 / 16, values 32 /
16); ``cachegen-hq`` four times as many.
"""

from __future__ import annotations

import blosc2
import numpy as np

from kvtier.codecs.base import FLOAT_DTYPES, Codec, as_float32, as_fp16, finite, store_float32, take, tensor
from kvtier.codecs.lossless import compress, decompress_into
from kvtier.memory.layout import KVLayout


class CacheGenCodec(Codec):
    name = "cachegen"
    codec_id = 4
    version = 1
    lossy = True
    early_bins = 32  # keys of the first third of the layers, values of the first two
    late_bins = 16

    def supports(self, layout: KVLayout, num_tokens: int) -> bool:
        small_enough = layout.chunk_bytes(num_tokens) < blosc2.MAX_BUFFERSIZE
        return layout.dtype in FLOAT_DTYPES and layout.kv_size == 2 and small_enough

    def bins(self, layout: KVLayout) -> np.ndarray:
        """Bins per (layer, K/V)."""
        bins = np.full((layout.num_layers, 2), self.late_bins, np.uint8)
        bins[: max(1, layout.num_layers // 3), 0] = self.early_bins
        bins[:2, 1] = self.early_bins
        return bins

    def encode(self, payload: memoryview, layout: KVLayout, num_tokens: int) -> bytes:
        import torch

        values = finite(as_float32(payload, layout)).view(layout.num_layers, 2, num_tokens, -1)  # (L, 2, T, C)
        bins = self.bins(layout)
        half = torch.from_numpy(bins.astype(np.float32) / 2)[:, :, None, None]
        scales16 = as_fp16(values.abs().amax(dim=2, keepdim=True) / half)
        divisor = scales16.float().clamp_min(torch.finfo(torch.float16).tiny)
        symbols = (values / divisor).round_().add_(half).clamp_(min=0).clamp_(max=half * 2).to(torch.uint8)
        frame = compress(symbols.numpy(), typesize=1, shuffle=False)
        return b"".join((bins.tobytes(), scales16.contiguous().view(torch.uint8).numpy().tobytes(), frame))

    def decode(self, encoded: memoryview, layout: KVLayout, num_tokens: int, out: memoryview) -> None:
        layers, channels = layout.num_layers, layout.num_kv_heads * layout.head_dim
        bins, offset = take(encoded, 0, layers * 2, "bins")
        scales, offset = take(encoded, offset, layers * 2 * channels * 2, "scales")
        symbols = np.empty(layers * 2 * channels * num_tokens, np.uint8)
        decompress_into(encoded[offset:], symbols, symbols.nbytes)
        half = tensor(bins, "uint8").float().div_(2).view(layers, 2, 1, 1)
        codes = tensor(memoryview(symbols), "uint8").view(layers, 2, num_tokens, channels).float()
        values = codes.sub_(half).mul_(tensor(scales, "float16").float().view(layers, 2, 1, channels))
        store_float32(values, layout, out)

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        channels = layout.num_kv_heads * layout.head_dim
        symbols = layout.num_layers * 2 * channels * num_tokens
        return layout.num_layers * 2 * (1 + 2 * channels) + symbols + blosc2.MAX_OVERHEAD


class CacheGenHQCodec(CacheGenCodec):
    """Four times CacheGen's bins (keys 128 / 64, values 128 / 64): 1.5x larger, a quarter of the error."""

    name = "cachegen-hq"
    codec_id = 5
    early_bins = 128
    late_bins = 64
