"""A kvtier server as the remote tier of an in-process engine (``remote_url: kvtier://host:port``).

The engine keeps its own memory (and disk) tiers in front; chunks it lacks are asked of the server by key, in
one request per batch, in the same checksummed chunk format as every other remote store. The server may hold
chunks of many engines; names are key ids, so the ``remote_prefix`` plays no part here.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from kvtier.client.client import Connection
from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError
from kvtier.metrics import CacheMetrics
from kvtier.protocol import MAX_KEYS
from kvtier.storage.remote import RemoteStore, RemoteTier, Value
from kvtier.tokens.keys import Namespace


class KVTierServerStore(RemoteStore):
    def __init__(self, connection: Connection, prefix: str) -> None:
        self.connection = connection
        self.prefix = prefix

    def _key(self, name: str) -> str:
        return name.removeprefix(self.prefix)

    def get_many(self, names: Sequence[str]) -> list[Value | None]:
        return [v for batch in _batches(names) for v in self.connection.get_keys([self._key(n) for n in batch])]

    def put(self, name: str, parts: Sequence[Value], ttl_sec: float | None, namespace: Namespace | None = None) -> bool:
        # The server bills and clears chunks by tenant: it needs the namespace, not only the key's digest of it.
        namespaces = {namespace.digest.hex(): namespace.fields()} if namespace is not None else {}
        return self.connection.put_keys([self._key(name)], [b"".join(parts)], namespaces) > 0

    def exists_many(self, names: Sequence[str]) -> list[bool]:
        return [x for batch in _batches(names) for x in self.connection.exists_keys([self._key(n) for n in batch])]

    def delete_many(self, names: Sequence[str]) -> int:
        return sum(self.connection.delete_keys([self._key(n) for n in batch]) for batch in _batches(names))

    def clear(self, prefix: str) -> int:
        return self.connection.clear()

    def close(self) -> None:
        self.connection.close()


def _batches(names: Sequence[str]) -> list[Sequence[str]]:
    return [names[i : i + MAX_KEYS] for i in range(0, len(names), MAX_KEYS)]


def create_kvtier_tier(url: str, config: KVTierConfig, metrics: CacheMetrics) -> RemoteTier:
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        raise ConfigError(f"remote_url {url!r}: expected kvtier://host:port")
    if config.remote_serde != "naive":  # the server keeps KV raw in memory and decodes whatever it is sent
        raise ConfigError("remote_serde: a kvtier:// server takes raw chunks; set the server's own codecs instead")
    connection = Connection(
        f"tcp://{parts.hostname}:{parts.port}",
        timeout=config.remote_timeout_sec,
        retries=0,
        auth_token=config.auth_token(),
    )
    store = KVTierServerStore(connection, config.remote_prefix.rstrip("/") + "/")
    return RemoteTier.from_config("kvtier", store, config, metrics, applies_ttl=False)  # the server's budget decides
