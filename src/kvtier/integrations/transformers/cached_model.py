"""A transformers causal LM with kvtier under its prefill.

Before prefill the longest cached prefix of the prompt is loaded into a ``DynamicCache`` and the model runs only
on the remaining tokens; after prefill the prompt's new chunks are stored. The cache is an in-process engine
or a ``kvtier server`` (:mod:`kvtier.integrations.backend`); which one is configuration.

With ``enable_blending`` the prompt's segments (cut at ``blend_special_str``, or given) are cached by their own
content too, and reused wherever they appear: their KV is moved to its new positions and blended
(:mod:`kvtier.integrations.transformers.blend`, CacheBlend's selective recompute). A blended prompt stores its
segments, and its prefix chunks only up to its first reused segment: the KV after it is an approximation, which
must never be served as a prefix hit.

Works with Llama/Qwen/Mistral-style decoders (any number of KV heads, so GQA too) in fp32/fp16/bf16, on CPU
or CUDA: kvtier's chunks are ``(layers, kv, tokens, kv_heads, head_dim)``; a layer's keys in the cache are
``(batch=1, kv_heads, tokens, head_dim)``, so loading and storing are a transpose per layer.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.config import KVTierConfig, load_config
from kvtier.engine.results import describe_tiers
from kvtier.integrations.backend import KVBackend, open_backend
from kvtier.integrations.segment_io import SegmentFinder, load_segments, store_segments
from kvtier.integrations.transformers.blend import Blender
from kvtier.memory.layout import KVLayout
from kvtier.tokens import segments as segmenting
from kvtier.tokens.segments import Segment

log = logging.getLogger("kvtier")


@dataclass(frozen=True, slots=True)
class Verification:
    """A cache hit recomputed without the cache: the largest differences seen."""

    logits_max_abs_diff: float
    kv_max_abs_diff: float


@dataclass(slots=True)
class Prefill:
    """One prompt's prefill: what was reused, what was computed, how long each part took."""

    logits: torch.Tensor  # last position, (vocab,)
    cache: Any  # the DynamicCache holding the whole prompt, ready for decoding
    prompt_tokens: int
    reused_tokens: int  # loaded from kvtier and not computed
    computed_tokens: int  # computed fresh (not in the cache)
    tier_tokens: dict[str, int]  # loaded, by tier (prefix and segments)
    load_seconds: float  # retrieve + building the cache
    forward_seconds: float
    ttft_seconds: float  # request start until the first token is known
    stored_tokens: int = 0
    store_seconds: float = 0.0
    verification: Verification | None = None
    recomputed_tokens: int = 0  # loaded from kvtier, then recomputed by blending
    segments_reused: int = 0  # segments found in the cache (whole or in part) and blended in
    segments: list[Segment] = field(default_factory=list)  # the prompt's cacheable segments
    segment_hits: list[int] = field(default_factory=list)  # tokens of each segment found cached (-1: in the prefix)
    exact_tokens: int | None = None  # leading tokens whose KV is what a full prefill gives (None: all)
    prefix_tokens: int = 0  # loaded as the prompt's cached prefix

    @property
    def blended(self) -> bool:
        return self.segments_reused > 0

    @property
    def first_token(self) -> int:
        return int(self.logits.argmax())


@dataclass(slots=True)
class Generation:
    token_ids: list[int]  # the new tokens, first one included
    prefill: Prefill
    decode_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def kv_layout_of(model: Any) -> KVLayout:
    """kvtier's KV layout for a transformers decoder: layers, KV heads, head size and dtype from its config."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return KVLayout(config.num_hidden_layers, kv_heads, head_dim, str(model.dtype))


class CachedCausalLM:
    """Prefill and greedy generation of a causal LM, reusing KV through kvtier.

    ``backend``: where KV lives; by default one is opened from ``config`` (an in-process engine, or the server at
    ``config.server_url``) and closed with this object. ``cache_salt`` separates tenants. ``tokenizer`` (needed
    for blending by separator): the model's, to find ``blend_special_str``'s ids in prompts.
    """

    def __init__(
        self,
        model: Any,
        backend: KVBackend | None = None,
        *,
        config: KVTierConfig | None = None,
        model_name: str | None = None,
        cache_salt: str = "",
        tokenizer: Any = None,
    ) -> None:
        self.model = model.eval()
        self.layout = kv_layout_of(model)
        self.config = config or (backend.config if backend is not None else load_config())
        # Refuses, naming the reason, a model whose KV cannot be moved to other positions (before opening anything).
        self.blender = Blender(model) if self.config.enable_blending else None
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self._owns_backend = backend is None
        self.backend = backend or open_backend(self.config, self.layout, model_name=self.model_name)
        self.metrics = self.backend.metrics
        self.cache_salt = cache_salt
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.segment_finder = SegmentFinder(self.config, tokenizer)
        self._random = random.Random(0)
        self._staging_buffer: torch.Tensor | None = None  # prefill is not thread-safe: one prompt at a time

    @classmethod
    def from_pretrained(
        cls, path: str, *, config: KVTierConfig | None = None, dtype: Any = torch.float32, device: str = "cpu"
    ) -> CachedCausalLM:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        return cls(model, config=config, model_name=name, tokenizer=AutoTokenizer.from_pretrained(path))

    def join(self, texts: list[str]) -> tuple[list[int], list[Segment]]:
        """Token ids of ``texts`` joined by the separator, and each text's segment: each text is tokenized on its
        own, so the separator's ids appear as they are (a tokenizer may merge a separator with its neighbours)."""
        if self.tokenizer is None:
            raise ValueError("joining texts into segments needs the model's tokenizer")
        pieces = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        return segmenting.join(pieces, self.separator)

    @property
    def separator(self) -> list[int]:
        """``blend_special_str``'s token ids."""
        return self.segment_finder.separator

    # -- prefill ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        input_ids: Any,
        *,
        use_cache: bool = True,
        store: bool = True,
        segments: list[tuple[int, int]] | None = None,
    ) -> Prefill:
        """Run the prompt: load its cached prefix (and, blending, its cached segments), compute the rest, store
        what is new.

        ``use_cache=False`` computes everything and stores nothing (the no-cache baseline). ``segments``: the
        prompt's segments as ``(start, end)`` token ranges, instead of cutting it at the separator.
        """
        started = time.perf_counter()
        ids = _as_ids(input_ids)
        n = len(ids)
        if n == 0:
            raise ValueError("empty prompt")
        if not use_cache:
            return self._full_prefill(ids, started)
        tokens = ids.numpy()
        staged = self._staging(n)
        loaded = self.backend.retrieve(tokens, staged, cache_salt=self.cache_salt)
        tiers = dict(loaded.tier_tokens)
        exact = min(loaded.loaded_end, n - 1)  # the model must compute at least the last token to give its logits
        pieces = self.segment_finder.find(tokens, segments) if self.blender is not None else []
        reused, hits = (
            load_segments(self.backend, self.blender.rotary, tokens, staged, pieces, exact, tiers, self.cache_salt)
            if self.blender is not None and pieces
            else (None, [])
        )
        if reused is not None:
            result = self._blended_prefill(ids, staged, exact, reused, hits, tiers, started)
        else:
            cache = self._cache_from(staged, exact)
            loaded_at = time.perf_counter()
            logits = self._forward(ids, exact, cache)
            done = time.perf_counter()
            load, forward = loaded_at - started, done - loaded_at
            result = Prefill(logits, cache, n, exact, n - exact, tiers, load, forward, done - started)
        result.segments, result.segment_hits, result.prefix_tokens = pieces, hits, exact
        self._record(result)
        if store:
            self._store(tokens, result, loaded.loaded_end, staged)
        if (result.reused_tokens or result.blended) and self._should_verify():
            result.verification = self.verify(ids, result)
        return result

    def _full_prefill(self, ids: torch.Tensor, started: float) -> Prefill:
        cache = self._cache_from(None, 0)
        logits = self._forward(ids, 0, cache)
        done = time.perf_counter()
        n = len(ids)
        result = Prefill(logits, cache, n, 0, n, {}, 0.0, done - started, done - started)
        self._record(result)
        return result

    def _blended_prefill(
        self,
        ids: torch.Tensor,
        staged: torch.Tensor,
        exact: int,
        reused: torch.Tensor,
        hits: list[int],
        tiers: dict[str, int],
        started: float,
    ) -> Prefill:
        assert self.blender is not None
        n = len(ids)
        loaded_at = time.perf_counter()
        ratio, check = self.config.blend_recompute_ratios, self.config.blend_check_layers
        blended = self.blender.run(ids, staged, exact, reused, ratio, check)
        done = time.perf_counter()
        cache = self._cache_from(staged, n, copy=True)  # its own memory: the staging buffer serves the next prompt
        loaded = int(reused[exact:].sum())
        return Prefill(
            logits=blended.logits,
            cache=cache,
            prompt_tokens=n,
            reused_tokens=exact + loaded - blended.recomputed_tokens,
            computed_tokens=n - exact - loaded,
            tier_tokens=tiers,
            load_seconds=loaded_at - started,
            forward_seconds=done - loaded_at,
            ttft_seconds=done - started,
            recomputed_tokens=blended.recomputed_tokens,
            segments_reused=sum(1 for h in hits if h > 0),
            exact_tokens=int(torch.nonzero(reused)[0]),  # the tokens before the first loaded one attend to exact KV
        )

    def _staging(self, num_tokens: int) -> torch.Tensor:
        """A contiguous ``(layers, kv, num_tokens, heads, head_dim)`` CPU buffer, reused across prompts: fresh
        memory would cost a page fault per 4 KiB on every load (the cache copies out of it, so reuse is safe)."""
        numel = self.layout.bytes_per_token // self.layout.element.itemsize * num_tokens
        if self._staging_buffer is None or self._staging_buffer.numel() < numel:
            pin = self.device.type == "cuda"  # page-locked: host-to-device copies run as DMA
            self._staging_buffer = torch.empty(numel, dtype=self.model.dtype, pin_memory=pin)
        return self._staging_buffer[:numel].view(self.layout.chunk_shape(num_tokens))

    def _cache_from(self, staged: torch.Tensor | None, reused: int, *, copy: bool = False) -> Any:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        if staged is None or reused == 0:
            return cache
        kvs = []
        for layer in range(self.layout.num_layers):
            # (tokens, heads, head_dim) -> (1, heads, tokens, head_dim): a view (a copy only to reach a GPU, or
            # when asked: a cache no forward will copy out of the staging buffer)
            k = staged[layer, 0, :reused].transpose(0, 1).unsqueeze(0).to(self.device, non_blocking=True)
            v = staged[layer, 1, :reused].transpose(0, 1).unsqueeze(0).to(self.device, non_blocking=True)
            kvs.append((k.clone(), v.clone()) if copy and k.device == staged.device else (k, v))
        if len(cache.layers) == len(kvs) and all(type(layer) is DynamicLayer for layer in cache.layers):
            # Plain full-attention layers hold the views as they are: the forward's first update concatenates
            # them with the new tokens into fresh memory anyway, so filling the cache through update() (a
            # concatenation onto nothing) would copy the whole prefix once more for nothing.
            for layer, (k, v) in zip(cache.layers, kvs, strict=True):
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            return cache
        return DynamicCache(ddp_cache_data=kvs, config=self.model.config)

    def _forward(self, ids: torch.Tensor, start: int, cache: Any) -> torch.Tensor:
        suffix = ids[start:].unsqueeze(0).to(self.device)
        positions = torch.arange(start, len(ids), device=self.device).unsqueeze(0)
        out = self.model(
            input_ids=suffix, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        return out.logits[0, -1].float()

    # -- store --------------------------------------------------------------------------------------
    def _store(self, tokens: Any, result: Prefill, loaded_end: int, staged: torch.Tensor) -> None:
        """Store what the cache lacks: the prompt's prefix chunks that were not loaded, as far as its KV is what a
        full prefill gives (up to its first blended segment), and its segments that were not whole in the cache,
        their keys turned back to no position. Copies out of the model's cache, through ``staged``."""
        started = time.perf_counter()
        stored = self._store_prefix(tokens, result, loaded_end, staged)
        if result.segments:
            stored += self._store_segments(tokens, result, staged)
        if stored or result.segments:
            result.stored_tokens = stored
            result.store_seconds = time.perf_counter() - started

    def _store_prefix(self, tokens: Any, result: Prefill, loaded_end: int, staged: torch.Tensor) -> int:
        chunk = self.backend.chunk_size
        skip = loaded_end - loaded_end % chunk
        exact = len(tokens) if result.exact_tokens is None else result.exact_tokens
        whole = exact == len(tokens) and self.config.save_unfull_chunk
        storable = exact if whole else exact - exact % chunk
        if storable <= skip:
            return 0
        self._stage(result.cache, staged, skip, storable)
        return self.backend.store(
            tokens[:storable], staged[:, :, :storable], skip_tokens=skip, cache_salt=self.cache_salt
        )

    def _store_segments(self, tokens: Any, result: Prefill, staged: torch.Tensor) -> int:
        assert self.blender is not None

        def kv_of(piece: Segment) -> torch.Tensor:
            self._stage(result.cache, staged, piece.start, piece.end)
            return staged[:, :, piece.start : piece.end]

        pieces, hits = result.segments, result.segment_hits
        return store_segments(self.backend, self.blender.rotary, tokens, pieces, hits, kv_of, self.cache_salt)

    def _stage(self, cache: Any, staged: torch.Tensor, start: int, end: int) -> None:
        """Copy tokens ``[start, end)`` of ``cache`` into ``staged`` (kvtier's layout)."""
        for layer in range(self.layout.num_layers):
            keys, values = cache.layers[layer].keys, cache.layers[layer].values
            staged[layer, 0, start:end].copy_(keys[0, :, start:end].transpose(0, 1))
            staged[layer, 1, start:end].copy_(values[0, :, start:end].transpose(0, 1))

    def _record(self, result: Prefill) -> None:
        m = self.metrics
        m.requests.inc()
        m.prompt_tokens.inc(result.prompt_tokens)
        m.reused_tokens.inc(result.reused_tokens)
        m.computed_tokens.inc(result.computed_tokens)
        m.ttft_seconds.observe(result.ttft_seconds)
        where = describe_tiers(result.tier_tokens)
        if result.blended:
            m.blended_prompts.inc()
            m.recomputed_tokens.inc(result.recomputed_tokens)
            loaded = sum(result.tier_tokens.values())
            log.info(
                "Retrieved %d tokens (%s; %d segments, %d recomputed) in %.1f ms; blended with %d new tokens in "
                "%.1f ms; TTFT %.1f ms",
                loaded,
                where,
                result.segments_reused,
                result.recomputed_tokens,
                result.load_seconds * 1e3,
                result.computed_tokens,
                result.forward_seconds * 1e3,
                result.ttft_seconds * 1e3,
            )
            return
        log.info(
            "Prefill of %d tokens: reused %d (%s, loaded in %.1f ms), computed %d in %.1f ms; TTFT %.1f ms",
            result.prompt_tokens,
            result.reused_tokens,
            where,
            result.load_seconds * 1e3,
            result.computed_tokens,
            result.forward_seconds * 1e3,
            result.ttft_seconds * 1e3,
        )

    # -- verification -------------------------------------------------------------------------------
    def _should_verify(self) -> bool:
        rate = self.config.verify_sample_rate
        return rate > 0 and self._random.random() < rate

    @torch.inference_mode()
    def verify(self, input_ids: Any, result: Prefill) -> Verification:
        """Recompute ``result``'s prompt without the cache; compare last-position logits and the reused KV."""
        ids = _as_ids(input_ids)
        fresh_cache = self._cache_from(None, 0)
        fresh_logits = self._forward(ids, 0, fresh_cache)
        logits_diff = float((fresh_logits - result.logits).abs().max())
        kv_diff = 0.0
        n = result.prompt_tokens if result.blended else result.reused_tokens  # blended: anywhere, by design
        for mine, theirs in zip(result.cache.layers, fresh_cache.layers, strict=True):
            kv_diff = max(
                kv_diff,
                float((mine.keys[..., :n, :] - theirs.keys[..., :n, :]).abs().max()),
                float((mine.values[..., :n, :] - theirs.values[..., :n, :]).abs().max()),
            )
        self.metrics.verify_checks.inc()
        self.metrics.observe_verify("logits", logits_diff)
        self.metrics.observe_verify("kv", kv_diff)
        log.info("Verified a hit of %d tokens: max |diff| logits %.3g, KV %.3g", n, logits_diff, kv_diff)
        return Verification(logits_diff, kv_diff)

    # -- generation ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, input_ids: Any, max_new_tokens: int = 32, *, eos_token_id: int | None = None, use_cache: bool = True
    ) -> Generation:
        """Greedy decoding after :meth:`prefill` (what the equality checks compare: no sampling noise)."""
        prefill = self.prefill(input_ids, use_cache=use_cache)
        eos = eos_token_id if eos_token_id is not None else self._eos_token_id()
        tokens = [prefill.first_token]
        started = time.perf_counter()
        cache = prefill.cache
        while len(tokens) < max_new_tokens and tokens[-1] != eos:
            step = torch.tensor([[tokens[-1]]], device=self.device)
            logits = self.model(input_ids=step, past_key_values=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
        return Generation(tokens, prefill, time.perf_counter() - started)

    def _eos_token_id(self) -> int | None:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        return eos[0] if isinstance(eos, list) else eos

    def close(self) -> None:
        if self._owns_backend:
            self.backend.close()

    def __enter__(self) -> CachedCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_ids(input_ids: Any) -> torch.Tensor:
    """A 1-D int64 CPU tensor from a list, numpy array or tensor (a batch of one is accepted)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"expected one prompt of token ids, got shape {tuple(ids.shape)}")
    return ids
