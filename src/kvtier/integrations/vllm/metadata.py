"""What vLLM's scheduler process tells the worker processes to load and store in one engine step.

vLLM pickles this to every worker; the worker keeps no per-request state of its own between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.integrations.vllm.compat import KVConnectorMetadata


@dataclass(frozen=True, slots=True)
class SegmentHit:
    """A prompt's segment ``[start, end)`` and how many of its tokens the cache held when the request came in."""

    start: int
    end: int
    cached: int


@dataclass(frozen=True, slots=True)
class LoadOp:
    """Load the cached KV of prompt positions ``[start, end)`` into the request's blocks before the forward.

    ``tokens`` is the prompt prefix whose chunks are read (it may run past ``end``: a full hit reads the last
    chunk but vLLM must compute the last prompt token itself); ``skip`` chunk-aligned tokens are not read.
    ``blend``: ``[start, end)`` is produced by blending (``tokens`` is then the whole prompt): the cached prefix
    and ``segments`` are loaded, and the rest computed by the worker's blender.
    """

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    start: int
    end: int
    skip: int
    cache_salt: str
    num_prompt_tokens: int
    blend: bool = False
    segments: tuple[SegmentHit, ...] = ()
    background: bool = False  # loaded off the step: the request waits in vLLM until the worker reports it done


@dataclass(frozen=True, slots=True)
class StoreOp:
    """Store a prompt's KV (computed by the end of this step) from the request's blocks: its chunks
    ``tokens[skip:prefix_end]`` (``skip`` chunk-aligned tokens are cached already; past ``prefix_end`` the KV is
    blended, an approximation never stored as a prefix), and its ``segments`` that the cache lacked. With
    ``holds_blocks`` (``save_decode_cache``) the op is a finished request's: ``tokens`` are its prompt and output."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    skip: int
    cache_salt: str
    prefix_end: int
    segments: tuple[SegmentHit, ...] = ()
    background: bool = False  # written off the step (copied out of the blocks in it)
    holds_blocks: bool = False  # a finished request's (decode KV): vLLM frees its blocks once reported copied


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)
    idle: bool = False  # nothing is scheduled in this step
