"""A third-party remote tier in one module, as a plugin distribution would ship it: chunks as files in a directory
(``dirstore:///path``), registered through the ``kvtier.tiers`` entry point group (see the dist-info beside it).

A :class:`RemoteStore` is five byte operations; :class:`RemoteTier` adds the chunk format's checksums, the circuit
breaker, metrics and the cost model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from kvtier.config import KVTierConfig
from kvtier.metrics import CacheMetrics
from kvtier.storage.remote import RemoteStore, RemoteTier, Value
from kvtier.tokens.keys import Namespace


class DirectoryStore(RemoteStore):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / name

    def get_many(self, names: Sequence[str]) -> list[Value | None]:
        return [self._path(n).read_bytes() if self._path(n).exists() else None for n in names]

    def exists_many(self, names: Sequence[str]) -> list[bool]:
        return [self._path(n).exists() for n in names]

    def put(self, name: str, parts: Sequence[Value], ttl_sec: float | None, namespace: Namespace | None = None) -> bool:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            for part in parts:
                tmp.write(part)
        try:
            os.link(tmp.name, path)  # atomic, and only if absent
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp.name)

    def delete_many(self, names: Sequence[str]) -> int:
        deleted = 0
        for name in names:
            try:
                self._path(name).unlink()
                deleted += 1
            except FileNotFoundError:
                pass
        return deleted

    def clear(self, prefix: str) -> int:
        return self.delete_many([str(p.relative_to(self.root)) for p in self.root.glob(prefix + "**/*") if p.is_file()])


def create_tier(url: str, config: KVTierConfig, metrics: CacheMetrics) -> RemoteTier:
    return RemoteTier.from_config("dirstore", DirectoryStore(Path(urlsplit(url).path)), config, metrics)
