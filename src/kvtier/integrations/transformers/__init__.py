"""kvtier under a HuggingFace transformers causal LM: :class:`CachedCausalLM` (needs ``torch`` and
``transformers``)."""

from kvtier.integrations.transformers.cached_model import (
    CachedCausalLM,
    Generation,
    Prefill,
    Verification,
    kv_layout_of,
)

__all__ = ["CachedCausalLM", "Generation", "Prefill", "Verification", "kv_layout_of"]
