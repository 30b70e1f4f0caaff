"""Blending in vLLM's worker: the recomputed tokens of a blended prompt are computed by a transformers copy of the
model, because vLLM's connector API never hands a connector the model.

vLLM 0.32 gives a connector the KV caches (``register_kv_caches``) and each step's attention metadata
(``start_load_kv``), not the model's weights or modules; running vLLM's own layers on a scattered subset of tokens,
as LMCache does, needs vLLM's worker patched to hand the model over. And vLLM computes only a contiguous suffix of
a prompt, so it cannot recompute scattered tokens itself. What the API does allow: the scheduler claims a
blendable prompt's tokens up to the last as loaded from the cache, and the worker produces their KV before vLLM's
forward: the cached prefix and segments are loaded, and the blended tokens computed by
:class:`~kvtier.integrations.transformers.blend.Blender` on a transformers copy of the same weights (loaded from
the model's directory at start: a second copy of the weights in memory). vLLM then computes the last token with
its own kernels over that KV.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvtier.config import KVTierConfig
from kvtier.integrations.transformers.blend import Blender
from kvtier.integrations.transformers.rope import RotaryKeys

log = logging.getLogger("kvtier")


class WorkerBlender:
    """The transformers copy of vLLM's model and its blender, on vLLM's device."""

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device, config: KVTierConfig) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.blender = Blender(model)  # refuses a model whose KV cannot be moved, naming why, at vLLM's start
        self.ratio = config.blend_recompute_ratios
        self.check_layer = config.blend_check_layers
        self.device = device
        log.info("kvtier: blending with a transformers copy of %s (%s, %s)", model_path, dtype, device)

    @property
    def rotary(self) -> RotaryKeys:
        return self.blender.rotary

    def blend(self, ids: list[int], kv: torch.Tensor, exact: int, reused: torch.Tensor) -> Any:
        """Complete ``kv`` ``(layers, 2, len(ids), heads, head_dim)`` (see :meth:`Blender.run`)."""
        return self.blender.run(torch.tensor(ids), kv, exact, reused, self.ratio, self.check_layer)
