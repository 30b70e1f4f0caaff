"""SGLang: kvtier as HiCache's L3 storage tier (:class:`~kvtier.integrations.sglang.hicache.KVTierHiCacheStorage`),
loaded by SGLang's own ``dynamic`` storage backend factory."""
