"""What vLLM's scheduler process tells the worker processes to load and store in one engine step.

vLLM pickles this to every worker; the worker keeps no per-request state of its own between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.integrations.vllm.compat import KVConnectorMetadata


@dataclass(frozen=True, slots=True)
class LoadOp:
    """Load the cached KV of prompt positions ``[start, end)`` into the request's blocks before the forward.

    ``tokens`` is the prompt prefix whose chunks are read (it may run past ``end``: a full hit reads the last
    chunk but vLLM must compute the last prompt token itself); ``skip`` chunk-aligned tokens are not read.
    """

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    start: int
    end: int
    skip: int
    cache_salt: str
    num_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class StoreOp:
    """Store the KV of the whole prompt ``tokens`` (computed by the end of this step) from the request's blocks;
    the first ``skip`` tokens (chunk-aligned) are cached already and not read."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    skip: int
    cache_salt: str


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)
