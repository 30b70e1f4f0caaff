"""What one chunk of KV looks like: the explicit, engine-independent description kvtier stores.

A chunk is one contiguous buffer shaped ``(num_layers, kv_size, num_tokens, num_kv_heads, head_dim)``
(kv_size is 2 for separate K and V, 1 for a single latent as in MLA). Layer-major order lets a
layer-wise loader copy one layer's slab without touching the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.errors import LayoutError


@dataclass(frozen=True, slots=True)
class DType:
    """A KV element type: its stable on-disk code, size, and numpy/torch names."""

    name: str
    code: int
    itemsize: int
    numpy_name: str  # numpy has no bf16/fp8: those are carried as raw unsigned ints of the same width
    torch_name: str


_DTYPES = [
    DType("float16", 1, 2, "float16", "float16"),
    DType("bfloat16", 2, 2, "uint16", "bfloat16"),
    DType("float32", 3, 4, "float32", "float32"),
    DType("float8_e4m3fn", 4, 1, "uint8", "float8_e4m3fn"),
    DType("float8_e5m2", 5, 1, "uint8", "float8_e5m2"),
    DType("int8", 6, 1, "int8", "int8"),
    DType("uint8", 7, 1, "uint8", "uint8"),
]
DTYPES_BY_NAME = {d.name: d for d in _DTYPES}
DTYPES_BY_CODE = {d.code: d for d in _DTYPES}
_ALIASES = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}


def dtype_by_name(name: str) -> DType:
    """Resolve a dtype name such as ``"float16"``, ``"torch.bfloat16"`` or ``"half"``."""
    key = str(name).removeprefix("torch.").lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPES_BY_NAME:
        raise LayoutError(f"unsupported KV dtype {name!r}; supported: {sorted(DTYPES_BY_NAME)}")
    return DTYPES_BY_NAME[key]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape and element type of a model's KV, per token: everything needed to size and check a chunk."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    kv_size: int = 2

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"KVLayout.{field} must be a positive int, got {value!r}")
        if self.kv_size not in (1, 2):
            raise LayoutError(f"KVLayout.kv_size must be 1 (latent) or 2 (K and V), got {self.kv_size!r}")
        object.__setattr__(self, "dtype", dtype_by_name(self.dtype).name)

    @property
    def element(self) -> DType:
        return DTYPES_BY_NAME[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.kv_size * self.num_kv_heads * self.head_dim * self.element.itemsize

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of a chunk (or of a whole prompt's KV) holding ``num_tokens`` tokens."""
        return (self.num_layers, self.kv_size, num_tokens, self.num_kv_heads, self.head_dim)

    def chunk_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def descriptor(self) -> str:
        """A stable text form; it is part of every cache key so KV of one layout never serves another."""
        # v2: chunks the vLLM connector stored from vLLM's CPU backend under v1 held keys in that kernel's
        # dimension-major order, not the model's: a new version makes every v1 chunk a miss, never wrong KV.
        return f"lkthd-v2:L{self.num_layers}:KV{self.kv_size}:H{self.num_kv_heads}:D{self.head_dim}:{self.dtype}"

    def check_shape(self, shape: tuple[int, ...], what: str = "KV") -> int:
        """Check a ``(layers, kv, tokens, heads, head_dim)`` shape; return its token count."""
        shape = tuple(int(s) for s in shape)
        if (
            len(shape) != 5
            or shape[:2] != (self.num_layers, self.kv_size)
            or shape[3:]
            != (
                self.num_kv_heads,
                self.head_dim,
            )
        ):
            raise LayoutError(
                f"{what} shape {shape} does not match layout {self.chunk_shape(-1)} "
                "(layers, kv, tokens, kv_heads, head_dim; -1 = any token count)"
            )
        return shape[2]
