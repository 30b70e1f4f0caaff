"""CacheBlend's selective recompute on a transformers decoder: a prompt whose segments' KV was loaded from the
cache (and moved to their positions) is run layer by layer, recomputing only the tokens whose KV deviates most
from what a full prefill would give.

The prompt's tokens are of three kinds. *Exact*: a cached prefix, KV as a full prefill would give, never
recomputed. *Reused*: loaded segments, KV computed in another context. *Fresh*: everything else (separators, the
question), always computed. With recompute ratio ``r`` and check layer ``c`` (``blend_check_layers``, as in
LMCache):

1. layers ``0..c`` run on every reused and fresh token (these layers' KV is then what a full prefill gives);
2. at layer ``c`` each reused token's new key is compared with its loaded one; the ``r`` share of reused tokens
   that deviate most, the fresh tokens and the last token are kept. (Layer 0 cannot tell: its keys depend on the
   token and its position only, not on the context, so ``c`` is 1 or more);
3. the remaining layers run on the kept tokens only: their new KV replaces the loaded KV, and their queries attend
   to everything before them (loaded, recomputed or exact).

``r = 0`` computes only the fresh tokens (the loaded KV is used as it is, at every layer); ``r = 1`` computes every
token at every layer: a full prefill. The layers are the model's own modules (its projections, norms, MLP and
rotary tables), driven here with an explicit attention mask, so any decoder of the Llama family works: Llama,
Mistral (without a sliding window shorter than the prompt), Qwen2 and Qwen3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvtier.integrations.transformers.rope import RotaryKeys, UnsupportedModel, rotate_half

BLENDABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True, slots=True)
class BlendResult:
    logits: torch.Tensor  # the last token's, (vocab,)
    recomputed_tokens: int  # reused tokens whose KV was recomputed from the first non-full layer on
    fresh_tokens: int


class Blender:
    """Runs blended prefills for one model. Checks at construction that the model can be blended."""

    def __init__(self, model: Any) -> None:
        config = model.config.get_text_config(decoder=True)
        if config.model_type not in BLENDABLE_MODEL_TYPES:
            raise UnsupportedModel(
                f"blending runs {', '.join(BLENDABLE_MODEL_TYPES)} decoders, not {config.model_type!r}"
            )
        self.model = model
        self.rotary = RotaryKeys(model)
        uses_window = getattr(config, "use_sliding_window", True)
        self.sliding_window: int | None = getattr(config, "sliding_window", None) if uses_window else None

    def check_prompt(self, num_tokens: int) -> None:
        """Refuse a prompt the blended pass would attend differently from the model (past a sliding window)."""
        if self.sliding_window and num_tokens > self.sliding_window:
            raise UnsupportedModel(
                f"cannot blend a prompt of {num_tokens} tokens: the model attends within {self.sliding_window}"
            )

    @torch.inference_mode()
    def run(
        self,
        ids: torch.Tensor,
        kv: torch.Tensor,
        exact: int,
        reused: torch.Tensor,
        ratio: float,
        check_layer: int,
    ) -> BlendResult:
        """Blend the prompt ``ids`` (``(n,)``) whose KV is in ``kv`` ``(layers, 2, n, kv_heads, head_dim)``:
        tokens ``[0, exact)`` exact, those where ``reused`` (``(n,)`` bool) is set loaded. ``kv`` is completed
        in place (fresh and recomputed tokens' KV written); returns the last token's logits."""
        n = len(ids)
        self.check_prompt(n)
        exact = min(exact, n - 1)
        inner = self.model.model
        device = kv.device
        positions = torch.arange(n, device=device)
        loaded = reused.to(device).clone()
        loaded[:exact] = False
        fresh = ~loaded
        fresh[:exact] = False
        fresh[n - 1] = True  # its logits are the prefill's result
        layers = len(inner.layers)
        full = 0 if ratio <= 0 else (layers if ratio >= 1 else min(check_layer + 1, layers))
        active = positions[exact:] if full else positions[fresh]
        hidden = inner.embed_tokens(ids.to(device)[active])
        cos_all, sin_all = inner.rotary_emb(hidden, positions.view(1, -1))
        cos_all, sin_all = cos_all[0], sin_all[0]
        recomputed = int(loaded.sum()) if full else 0
        for index, layer in enumerate(inner.layers):
            selects_here = index == full - 1 and full < layers
            hidden, deviation = self._layer(
                layer, index, hidden, active, kv, cos_all, sin_all, loaded if selects_here else None
            )
            if deviation is not None:
                keep = self._select(active, deviation, loaded, fresh, ratio)
                recomputed = int(loaded[active[keep]].sum())
                active, hidden = active[keep], hidden[keep]
        last = inner.norm(hidden[-1:])
        logits = self.model.lm_head(last)[0].float()
        return BlendResult(logits, recomputed, int(fresh[exact:].sum()))

    def _layer(
        self,
        layer: Any,
        index: int,
        hidden: torch.Tensor,
        active: torch.Tensor,
        kv: torch.Tensor,
        cos_all: torch.Tensor,
        sin_all: torch.Tensor,
        loaded: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoder layer over the ``active`` tokens; their KV written into ``kv[index]``. With ``loaded``,
        also each active token's squared distance between its new key and the loaded one (0 where not loaded)."""
        attn = layer.self_attn
        head_dim = self.rotary.head_dim
        h = layer.input_layernorm(hidden)
        count = len(active)
        q = attn.q_proj(h).view(count, -1, head_dim)
        k = attn.k_proj(h).view(count, -1, head_dim)
        v = attn.v_proj(h).view(count, -1, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: a norm per head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = cos_all[active].unsqueeze(1), sin_all[active].unsqueeze(1)  # (count, 1, head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        deviation = None
        if loaded is not None:
            old_k, old_v = kv[index, 0, active].float(), kv[index, 1, active].float()
            moved = ((k.float() - old_k) ** 2).sum(dim=(1, 2)) + ((v.float() - old_v) ** 2).sum(dim=(1, 2))
            deviation = moved * loaded[active]
        kv[index, 0, active] = k.to(kv.dtype)
        kv[index, 1, active] = v.to(kv.dtype)
        end = int(active[-1]) + 1  # no active token attends past itself
        keys = kv[index, 0, :end].transpose(0, 1).unsqueeze(0).to(q.dtype)  # (1, kv_heads, end, head_dim)
        values = kv[index, 1, :end].transpose(0, 1).unsqueeze(0).to(q.dtype)
        mask = torch.arange(end, device=active.device).unsqueeze(0) <= active.unsqueeze(1)  # (count, end)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True
        )
        hidden = hidden + attn.o_proj(out[0].transpose(0, 1).reshape(count, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, deviation

    @staticmethod
    def _select(
        active: torch.Tensor, deviation: torch.Tensor, loaded: torch.Tensor, fresh: torch.Tensor, ratio: float
    ) -> torch.Tensor:
        """Indices into ``active`` of the tokens to carry on: fresh ones, and the ``ratio`` share of loaded ones
        whose keys deviate most, in position order."""
        is_loaded = loaded[active]
        budget = round(ratio * int(is_loaded.sum()))
        keep = fresh[active].clone()
        if budget:
            scores = torch.where(is_loaded, deviation, torch.full_like(deviation, -1.0))
            keep[torch.topk(scores, budget).indices] = True
        return torch.nonzero(keep).flatten()
