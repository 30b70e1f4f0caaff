"""What approximate KV does to a model's next-token distributions, measured the same way for kvtier's codecs
(``bench_codecs.py``) and LMCache's CacheGen (``lmcache_baseline/bench_lmcache_cachegen.py``, in LMCache's own
venv: this module needs only torch and transformers).

The model reads a real continuation of the context (teacher-forced) once over the context's exact KV and once over
a codec's round trip of it; every continuation position's next-token distribution is compared (KL divergence and
whether the most likely token is the same).
"""

from __future__ import annotations

from typing import Any

import torch


def continuation_logits(model: Any, kv: torch.Tensor, continuation: list[int]) -> torch.Tensor:
    """The model's logits at each position of ``continuation`` read after a context whose KV is ``kv``
    (``(layers, 2, tokens, kv_heads, head_dim)``, the model's dtype)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in range(kv.shape[0]):
        keys, values = (kv[layer, i].transpose(0, 1).unsqueeze(0).contiguous() for i in (0, 1))
        cache.update(keys, values, layer)
    with torch.no_grad():
        ids = torch.tensor([continuation], dtype=torch.long)
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].double()


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Mean KL(reference || logits) in nats and top-1 agreement over the positions."""
    p, q = torch.log_softmax(reference, dim=-1), torch.log_softmax(logits, dim=-1)
    kl = (p.exp() * (p - q)).sum(dim=-1)
    top1 = (reference.argmax(dim=-1) == logits.argmax(dim=-1)).double()
    return {"mean_kl": float(kl.mean()), "top1_agreement": float(top1.mean())}
