"""Payload codecs by name (the values of ``remote_serde`` / ``local_disk_serde``) and by the id chunk headers carry.

Each codec lives in its own module, imported on first use, so its library (blosc2, torch) stays an optional
extra; a codec whose library is missing is a ConfigError naming what installs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

from kvtier.codecs.base import Codec
from kvtier.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CodecEntry:
    """Where a codec class lives (``"module:Class"``), its header id, the libraries it needs (imported lazily by
    its module, so checked here) and the extra that installs them."""

    target: str
    codec_id: int
    requires: tuple[str, ...] = ()
    extra: str = ""


CODECS: dict[str, CodecEntry] = {
    "naive": CodecEntry("kvtier.codecs.naive:NaiveCodec", 0),
    "lossless": CodecEntry("kvtier.codecs.lossless:LosslessCodec", 1, ("blosc2",), "compress"),
    "int8": CodecEntry("kvtier.codecs.quantize:Int8Codec", 2, ("torch",), "torch"),
    "int4": CodecEntry("kvtier.codecs.quantize:Int4Codec", 3, ("torch",), "torch"),
    "cachegen": CodecEntry("kvtier.codecs.cachegen:CacheGenCodec", 4, ("torch", "blosc2"), "torch,compress"),
    "cachegen-hq": CodecEntry("kvtier.codecs.cachegen:CacheGenHQCodec", 5, ("torch", "blosc2"), "torch,compress"),
}
_NAMES_BY_ID = {entry.codec_id: name for name, entry in CODECS.items()}


@cache
def codec_named(name: str) -> Codec:
    """The codec called ``name``; ConfigError for an unknown name or a missing library."""
    entry = CODECS.get(name)
    if entry is None:
        raise ConfigError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    module_name, class_name = entry.target.split(":")
    try:
        for library in entry.requires:
            importlib.import_module(library)
        codec_class = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ConfigError(f"codec {name!r} needs {exc.name or exc}: pip install 'kvtier[{entry.extra}]'") from None
    codec: Codec = codec_class()
    return codec


def codec_with_id(codec_id: int) -> Codec | None:
    """The codec a chunk header's id names, or None when this build has no codec by that id or cannot load it
    (the chunk is then a miss for this reader, and kept for readers that can)."""
    name = _NAMES_BY_ID.get(codec_id)
    if name is None:
        return None
    try:
        return codec_named(name)
    except ConfigError:
        return None


NAIVE = codec_named("naive")
