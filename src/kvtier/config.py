"""The one typed configuration of kvtier, loaded in one place: defaults < YAML file < environment < CLI.

Keys and environment names follow LMCache where they mean the same thing (``chunk_size``, ``local_cpu``,
``max_local_cpu_size``, ``local_disk``, ``max_local_disk_size``, ``remote_url``, ``cache_policy``, ...;
``LMCACHE_CONFIG_FILE``, ``LMCACHE_CHUNK_SIZE``), so an LMCache config file works unchanged. ``KVTIER_*``
variables win over ``LMCACHE_*`` ones. Unknown keys in files and flags, and bad values anywhere, raise
:class:`ConfigError` naming the key; environment variables that name no key are not configuration (scripts set
``KVTIER_VENV``, LMCache users ``LMCACHE_LOG_LEVEL``) and are ignored, with a warning for a near miss of a key.
Sizes are in GiB (2**30 bytes), as LMCache's are.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import logging
import math
import os
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvtier.errors import ConfigError

log = logging.getLogger("kvtier.config")
GiB = 2**30
CONFIG_FILE_VARIABLES = ("KVTIER_CONFIG_FILE", "LMCACHE_CONFIG_FILE")
ENV_PREFIXES = ("KVTIER_", "LMCACHE_")  # later wins over earlier: KVTIER_ is applied last

# LMCache options kvtier does not implement, with the value that means "off" in LMCache. A config file or
# LMCACHE_* variable setting one of them to that value loads unchanged (there is nothing to do); any other
# value is an error naming the option, never silently ignored. ANY: kvtier's behaviour already covers it.
ANY = object()
LMCACHE_INERT_OPTIONS: dict[str, Any] = {
    "blocking_timeout_secs": ANY,  # kvtier's remote_timeout_sec: a slow store becomes misses, not waits
    "enable_async_loading": False,
    "enable_controller": False,
    "enable_p2p": False,
    "enable_pd": False,
    "extra_config": {},  # LMCache's free-form plugin options: kvtier has no plugin that would read them
    "internal_api_server_enabled": False,
    "local_cpu_use_hugepages": False,
    "local_disk_path_sharding": ANY,  # one disk tier per engine: no sharding to choose
    "numa_mode": None,
    "pre_caching_hash_algorithm": ANY,  # kvtier always hashes with BLAKE2b, stable across processes
    "use_layerwise": False,
}


# The eviction policies by name (``kvtier.storage.eviction`` implements one for each), and other spellings.
CACHE_POLICIES = ("FIFO", "LFU", "LRU", "S3FIFO")
_POLICY_ALIASES = {"S3-FIFO": "S3FIFO", "S3_FIFO": "S3FIFO"}


def policy_name(name: str) -> str:
    """The canonical name of eviction policy ``name`` (case-insensitive, S3-FIFO spellings too); ValueError
    naming the choices for anything else."""
    key = str(name).upper()
    key = _POLICY_ALIASES.get(key, key)
    if key not in CACHE_POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {list(CACHE_POLICIES)}")
    return key


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kvtier`` (``~/.cache/kvtier``): kvtier's own files of this user (chunks, models, records)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvtier"


def default_disk_path() -> str:
    """``$XDG_CACHE_HOME/kvtier/disk`` (``~/.cache/kvtier/disk``): where the embedded server keeps chunks."""
    return str(user_cache_dir() / "disk")


@dataclass(frozen=True)
class KVTierConfig:
    """Every setting of a kvtier engine. Build it with :func:`load_config`, not directly."""

    chunk_size: int = 256
    """Tokens per chunk (>= 1). Must match between processes that share a cache."""
    save_unfull_chunk: bool = False
    """Also store a prompt's trailing partial chunk (found again only for exactly the same prompt)."""
    local_cpu: bool = True
    """Keep chunks in host memory (L1). If false, memory only stages chunks for slower tiers."""
    max_local_cpu_size: float = 5.0
    """Host memory budget in GiB (also the staging budget when ``local_cpu`` is false)."""
    local_cpu_prefault: bool = False
    """Make the whole memory budget resident in the background at start, so first stores do not pay page
    faults (the server does this by default)."""
    pin_local_cpu: bool = False
    """Page-lock host memory with CUDA so copies to/from GPU tensors are asynchronous (needs torch + CUDA)."""
    cache_policy: str = "LRU"
    """Eviction policy of the memory and disk tiers: LRU, LFU, FIFO or S3FIFO."""
    local_disk: str | None = None
    """Directory of the disk tier (a path or ``file://`` URL); None disables it."""
    max_local_disk_size: float = 0.0
    """Disk tier budget in GiB; must be > 0 when ``local_disk`` is set."""
    disk_fsync: bool = False
    """fsync each chunk file before renaming it into place (slower; checksums already catch torn files)."""
    local_disk_serde: str = "naive"
    """Codec of the disk tier's payloads: naive (raw), lossless, int8, int4, cachegen, cachegen-hq
    (``docs/compression.md``; a lossy one only for a model that passed ``kvtier codec-gate``)."""
    remote_url: str | None = None
    """URL of a remote tier (a scheme registered in ``kvtier.storage.registry``)."""
    remote_timeout_sec: float = 2.0
    """Per-operation timeout of the remote tier (connect, read, write); a timeout is a miss."""
    remote_circuit_failures: int = 3
    """Consecutive remote failures after which the remote tier serves fast misses instead of waiting."""
    remote_circuit_cooldown_sec: float = 5.0
    """Seconds of fast misses before the remote tier is probed again (it recovers by itself)."""
    remote_admit_after_hits: int = 0
    """Write a chunk to the remote tier only once it has been hit this many times (0: on store)."""
    remote_ttl_sec: float = 0.0
    """Expire chunks in the remote store after this many seconds where the store supports it (0: never)."""
    remote_prefix: str = "kvtier"
    """Prefix of every name kvtier writes in the remote store."""
    remote_delete_corrupt: bool = True
    """Delete a remote chunk that fails verification (it is a miss either way)."""
    remote_serde: str = "naive"
    """Codec of the remote tier's payloads (LMCache's key and names): naive (raw), lossless, int8, int4, cachegen,
    cachegen-hq."""
    codec_gate: bool = True
    """Refuse a lossy codec for a model it has not passed the quality gate on (``kvtier codec-gate``)."""
    codec_gate_file: str | None = None
    """Quality gate records (default ``$XDG_CACHE_HOME/kvtier/codec_gates.json``)."""
    remote_max_connections: int = 16
    """Connections (Redis pool) or parallel requests (S3) per remote tier."""
    recompute_tokens_per_sec: float = 0.0
    """Prefill speed of the engine: a fetch estimated slower than recomputing is skipped (0: always fetch)."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (e.g. http://127.0.0.1:8333); None: AWS."""
    s3_region: str | None = None
    """S3 region; None: from the AWS environment/config."""
    s3_access_key_id: str | None = None
    """S3 access key; None: the standard AWS chain (AWS_ACCESS_KEY_ID, ~/.aws, ...)."""
    s3_secret_access_key: str | None = None
    """S3 secret key; None: the standard AWS chain."""
    host: str = "127.0.0.1"
    """Address the server's data plane (ZMQ) binds to."""
    port: int = 5555
    """Port of the server's data plane."""
    http_host: str = "127.0.0.1"
    """Address of the server's HTTP admin and metrics endpoint."""
    http_port: int = 8080
    """Port of the HTTP admin and metrics endpoint (0: none)."""
    server_workers: int = 4
    """Threads executing requests in the server."""
    server_max_inflight: int = 64
    """Requests the server accepts at once; beyond it clients are told to back off (status BUSY)."""
    server_max_request_mb: int = 1024
    """Largest message in MiB: larger requests are dropped by the transport; a reply is kept within it (a
    retrieve over TCP then returns a shorter prefix, a key-level read answers the rest as misses)."""
    server_max_inflight_mb: int = 2048
    """MiB of request payloads the server holds in progress; beyond it clients are told BUSY."""
    server_max_tokens: int = 1 << 20
    """Most tokens one request may carry."""
    server_shared_memory: bool = True
    """Back the server's memory with a shared-memory file so clients on the same host read and write KV in
    place (only small control messages cross the socket)."""
    server_lease_sec: float = 30.0
    """Seconds a client may hold shared-memory chunks it reserved or pinned before the server takes them back."""
    server_auth_token: str | None = None
    """Shared secret required on the data plane and on mutating admin endpoints (None: no auth)."""
    server_auth_token_file: str | None = None
    """File holding the shared secret (read at start), instead of ``server_auth_token``."""
    max_background_write_size: float = 1.0
    """GiB of chunks that may wait to be written to slower tiers; beyond it writes are dropped."""
    pin_timeout_sec: float = 300.0
    """Seconds after which a lookup lease that was never released expires (its pins are dropped)."""
    miss_history_entries: int = 1 << 16
    """Chunks whose last event (stored, evicted, refused, corrupt) is remembered to give misses a reason (~150
    bytes each; 0: misses are only "never stored", "after a prefix break" and the like)."""
    read_workers: int = 4
    """Threads reading chunks from slower tiers in parallel."""
    copy_threads: int = 2
    """Threads copying large chunks between numpy arrays and cache memory (one core cannot saturate memory)."""
    server_url: str | None = None
    """kvtier server an engine integration (transformers, vLLM) keeps KV in, e.g. tcp://127.0.0.1:5555; None: an
    in-process engine with the tiers configured here."""
    server_timeout_sec: float = 5.0
    """How long an integration waits for the server before treating the request as a miss."""
    async_store: bool = False
    """vLLM: store a prompt's KV off the engine step (its blocks stay allocated until the copy is done), so no step
    waits for a store."""
    enable_async_loading: bool = False
    """vLLM: load cached KV off the engine step (the request waits in vLLM while other requests run); LMCache's key."""
    save_decode_cache: bool = False
    """vLLM: when a request finishes, also store the KV of the tokens it generated (whole chunks of prompt + output),
    so a conversation's next turn, which repeats the answer, reuses it too; LMCache's key."""
    handoff_timeout_sec: float = 10.0
    """vLLM, disaggregated: how long a decoder waits for the KV its prefiller said it stored (``kv_transfer_params``)
    to be in the cache before it computes the prompt itself."""
    verify_sample_rate: float = 0.0
    """Fraction of cache hits an integration recomputes without the cache to compare (0: off; for tests)."""
    enable_blending: bool = False
    """Reuse cached segments anywhere in a prompt, not only a cached prefix (CacheBlend): each segment's KV is
    moved to its new position and the tokens that deviate most are recomputed (``docs/blending.md``)."""
    blend_special_str: str = " # # "
    """Separator between a prompt's segments (its token ids are searched for in the prompt)."""
    blend_recompute_ratios: float = 0.15
    """Fraction of a blended prompt's reused tokens recomputed (0: reuse the stored KV as it is; 1: recompute all)."""
    blend_check_layers: int = 2
    """Layer at which blending chooses the tokens to recompute (0-based; the layers up to it run on every token).
    Layer 0 cannot tell: its keys do not depend on the context."""
    blend_min_tokens: int = 256
    """Segments shorter than this are neither stored nor reused as segments (too little to be worth a lookup)."""
    log_level: str = "INFO"
    """Logging level of the ``kvtier`` logger."""

    def __post_init__(self) -> None:
        self._check_positive("chunk_size", self.chunk_size)
        self._check_positive("read_workers", self.read_workers)
        self._check_positive("copy_threads", self.copy_threads)
        for name in (
            "remote_circuit_failures",
            "remote_max_connections",
            "server_workers",
            "server_max_inflight",
            "server_max_request_mb",
            "server_max_tokens",
        ):
            self._check_positive(name, getattr(self, name))
        for name in (
            "max_local_cpu_size",
            "max_local_disk_size",
            "max_background_write_size",
            "pin_timeout_sec",
            "remote_timeout_sec",
            "remote_circuit_cooldown_sec",
            "remote_ttl_sec",
            "recompute_tokens_per_sec",
            "remote_admit_after_hits",
            "server_timeout_sec",
            "handoff_timeout_sec",
            "verify_sample_rate",
            "miss_history_entries",
        ):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ConfigError(f"{name} must be >= 0, got {value!r}")
            if name != "pin_timeout_sec" and math.isinf(value):  # sizes become byte counts
                raise ConfigError(f"{name} must be finite, got {value!r}")
        if not 0 <= self.blend_recompute_ratios <= 1:
            raise ConfigError(f"blend_recompute_ratios must be between 0 and 1, got {self.blend_recompute_ratios!r}")
        self._check_positive("blend_check_layers", self.blend_check_layers)
        self._check_positive("blend_min_tokens", self.blend_min_tokens)
        if self.enable_blending and not self.blend_special_str:
            raise ConfigError("blend_special_str must not be empty when enable_blending is on")
        if self.verify_sample_rate > 1:
            raise ConfigError(f"verify_sample_rate must be between 0 and 1, got {self.verify_sample_rate!r}")
        if self.max_local_cpu_size <= 0:
            raise ConfigError("max_local_cpu_size must be > 0 (memory also stages chunks for other tiers)")
        try:
            policy_name(self.cache_policy)
        except ValueError as exc:
            raise ConfigError(f"cache_policy: {exc}") from None
        if self.local_disk is not None:
            object.__setattr__(self, "local_disk", self.local_disk.removeprefix("file://") or None)
            if self.max_local_disk_size <= 0:
                raise ConfigError("max_local_disk_size must be > 0 when local_disk is set")
        for name in ("port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name} must be a TCP port (0-65535), got {getattr(self, name)!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log_level: unknown level {self.log_level!r}")

    @staticmethod
    def _check_positive(name: str, value: int) -> None:
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value!r}")

    def auth_token(self) -> str | None:
        """The server's shared secret, from ``server_auth_token`` or ``server_auth_token_file`` (read now: call
        it once, at start, and keep the value). A token file that is missing or empty is an error, never "no
        auth": a file emptied by mistake must not open the server."""
        if self.server_auth_token_file:
            try:
                token = Path(self.server_auth_token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"server_auth_token_file: cannot read it: {exc}") from None
            if not token:
                raise ConfigError(f"server_auth_token_file {self.server_auth_token_file} is empty")
            return token
        return self.server_auth_token or None

    @property
    def local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * GiB)

    @property
    def local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GiB)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(KVTierConfig)}


def field_docs() -> dict[str, str]:
    """Each key's one-line description: the docstring under its field above (for ``--help`` and docs)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(KVTierConfig)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = str(after.value.value).strip()  # type: ignore[union-attr]
    return docs


_HINTS = typing.get_type_hints(KVTierConfig)


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> KVTierConfig:
    """Build the configuration: defaults < YAML (``config_file`` or ``$KVTIER_CONFIG_FILE`` /
    ``$LMCACHE_CONFIG_FILE``) < ``LMCACHE_<KEY>`` < ``KVTIER_<KEY>`` < ``overrides`` (CLI flags; None values
    are ignored). ``defaults`` replace built-in defaults (a command's own, e.g. the server's disk tier)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {k: _coerce(k, v) for k, v in (defaults or {}).items() if _check_key(k, "defaults", v)}
    path = config_file or next((env[v] for v in CONFIG_FILE_VARIABLES if env.get(v)), None)
    if path:
        values.update(_read_yaml(Path(path)))
    values.update(_from_env(env))
    for key, value in (overrides or {}).items():
        if value is not None and _check_key(key, "command line", value):  # checked first: _coerce needs a key
            values[key] = _coerce(key, value)
    try:
        return KVTierConfig(**values)
    except TypeError as exc:  # should not happen: keys were checked
        raise ConfigError(str(exc)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return {k: _coerce(k, v) for k, v in data.items() if _check_key(k, str(path), v)}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for prefix in ENV_PREFIXES[::-1]:  # LMCACHE_ first, then KVTIER_ overrides it
        for name, raw in env.items():
            if not name.startswith(prefix) or name in CONFIG_FILE_VARIABLES:
                continue
            key = name[len(prefix) :].lower()
            if key in FIELDS:
                values[key] = _coerce(key, raw, source=name)
            elif key in LMCACHE_INERT_OPTIONS:
                _check_key(key, name, raw)
            else:  # not configuration (KVTIER_VENV, LMCACHE_LOG_LEVEL...); a near miss of a key is a likely typo
                _warn_if_typo(prefix, name, key)
    return values


def _warn_if_typo(prefix: str, name: str, key: str) -> None:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.85)
    if close:
        log.warning(
            "environment variable %s is not a kvtier setting (ignored); did you mean %s?",
            name,
            prefix + close[0].upper(),
        )


def _check_key(key: Any, source: str, value: Any) -> bool:
    """True for a kvtier key; False for an LMCache option set to its inert value; ConfigError otherwise."""
    if isinstance(key, str) and key in FIELDS:
        return True
    if isinstance(key, str) and key in LMCACHE_INERT_OPTIONS:
        inert = LMCACHE_INERT_OPTIONS[key]
        if inert is ANY or _same_value(value, inert):
            return False
        raise ConfigError(f"{source}: LMCache option {key}={value!r} is not supported by kvtier (only {inert!r})")
    raise ConfigError(f"{source}: unknown configuration key {key!r}")


def _same_value(value: Any, inert: Any) -> bool:
    if isinstance(inert, dict):  # an empty mapping, or nothing
        try:
            parsed = yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError:
            return False
        return parsed is None or parsed == inert
    if inert is None:
        return value is None or str(value).lower() in ("none", "null", "")
    if isinstance(inert, bool):
        try:
            return _to_bool(value) == inert
        except ValueError:
            return False
    return str(value) == str(inert)


def _coerce(key: str, value: Any, source: str | None = None) -> Any:
    """Convert ``value`` (a YAML value or an environment string) to the field's type."""
    hint = _HINTS[key]
    where = source or key
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "") and optional):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    origin = typing.get_origin(base) or base
    try:
        if origin is bool:
            return _to_bool(value)
        if origin is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("not an integer")
            return int(value)
        if origin is float:
            if isinstance(value, bool):
                raise ValueError("not a number")
            return float(value)
        if origin is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError("not a string")
            return str(value)
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where}: invalid value {value!r} for {key} ({exc})") from None
    raise ConfigError(f"{where}: unsupported type for {key}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean")


__all__ = ["CACHE_POLICIES", "GiB", "KVTierConfig", "default_disk_path", "load_config", "policy_name"]
