"""Why a prompt's KV was not served: what happened to each chunk (``history``), the reason of each miss
(``misses``) and the last requests with their hit/miss breakdown (``recent``)."""

from kvtier.diagnosis.history import Event, KeyHistory, Variant
from kvtier.diagnosis.misses import ChunkReport, Facts, MissReason, explain_misses, miss_tokens
from kvtier.diagnosis.recent import RecentRequests, RequestRecord

__all__ = [
    "ChunkReport",
    "Event",
    "Facts",
    "KeyHistory",
    "MissReason",
    "RecentRequests",
    "RequestRecord",
    "Variant",
    "explain_misses",
    "miss_tokens",
]
