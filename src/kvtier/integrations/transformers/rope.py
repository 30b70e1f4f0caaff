"""Moving keys between positions with a model's own rotary embedding (RoPE).

A key at position ``p`` is the model's pre-rotation key turned by ``p`` times a fixed frequency per pair of
dimensions. Segments are stored *unrotated* (turned back by their original positions) and turned to wherever they
are reused, with the same cos/sin tables the model itself uses, so a moved key equals the key the model computes
at the new position up to rounding. That holds whenever the angle is position x a fixed frequency: standard RoPE
and the ``linear``, ``llama3`` and ``yarn`` variants (yarn's attention factor is part of the stored key and stays
one factor). It does not hold, and such models are refused, when the frequencies depend on the sequence length
(``dynamic``, ``longrope``) or when only part of each head is rotated.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtier.errors import KVTierError

# rope_type -> why its keys cannot be moved (the others: position x a frequency fixed for the model)
UNMOVABLE_ROPE = {
    "dynamic": "its frequencies change with the sequence length",
    "longrope": "its frequencies change with the sequence length",
}


class UnsupportedModel(KVTierError):
    """A model whose cached KV cannot be reused away from its prefix; the message says why."""


class RotaryKeys:
    """Turn keys to other positions, and back, with ``model``'s rotary embedding."""

    def __init__(self, model: Any) -> None:
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise UnsupportedModel(f"{type(model).__name__} has no rotary embedding kvtier can use to move keys")
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in UNMOVABLE_ROPE:
            raise UnsupportedModel(f"cannot move keys of {rope_type!r} RoPE: {UNMOVABLE_ROPE[rope_type]}")
        config = model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotated = 2 * rotary.inv_freq.numel()
        if rotated != head_dim:
            raise UnsupportedModel(f"cannot move keys: RoPE turns {rotated} of the {head_dim} dimensions of a head")
        self.rotary = rotary
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.head_dim = head_dim

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own cos/sin at ``positions`` (``(n, head_dim)``), without its attention factor."""
        device = self.rotary.inv_freq.device
        probe = torch.empty(0, dtype=dtype, device=device)
        cos, sin = self.rotary(probe, positions.to(device).view(1, -1))
        return cos[0] / self.scaling, sin[0] / self.scaling

    def turn(self, keys: torch.Tensor, positions: torch.Tensor, *, back: bool = False) -> torch.Tensor:
        """``keys`` ``(..., n, heads, head_dim)`` turned to ``positions`` (``(n,)``), or back from them to none
        (``back``), computed in fp32 and returned in the keys' dtype."""
        cos, sin = self.cos_sin(positions)
        cos, sin = cos.to(keys.device).unsqueeze(-2), sin.to(keys.device).unsqueeze(-2)  # (n, 1, head_dim)
        k = keys.float()
        turned = k * cos + rotate_half(k) * (-sin if back else sin)
        return turned.to(keys.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The 90-degree turn of each dimension pair ``(i, i + d/2)``, as in the models' own RoPE."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
