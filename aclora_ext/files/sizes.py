"""The exact size of a LoRA file before it is written: the safetensors layout, and one module's tensors.

safetensors writes an 8-byte little-endian header length, then a compact JSON header
(``__metadata__`` first when metadata is given, then the tensors sorted by dtype, widest first, then
by name, each with its dtype, shape and data offsets) padded with spaces to a multiple of 8, then the
tensor bytes in that order. :func:`saved_file_size` adds what ``storage.save_state_dict`` adds, the
``sshs_*`` hashes (fixed lengths), so it equals ``os.path.getsize`` of the file written, metadata
included; tests/test_budget.py checks that byte for byte against the installed serializer (0.8.0
here; every file we write has one dtype, so only the order by name matters there).

:class:`ModuleLayout` is the tensors one kohya module writes at rank k and what a component costs;
:class:`FileLayout` is the whole file (every module's tensors and the
metadata) and its size at any ranks; the ranks a budget allows are ``fit.fit_ranks``'.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

# --- the safetensors layout ---------------------------------------------------------------------------------
#: safetensors' dtype names
DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("C64", "complex64"),
    ("U64", "uint64"),
    ("U32", "uint32"),
    ("U16", "uint16"),
):
    if hasattr(torch, _attr):
        DTYPE_NAMES[getattr(torch, _attr)] = _name
#: the order in which safetensors lays tensors out (its Dtype enum, largest first; then by name), as the
#: installed serializer does it (safetensors 0.8.0; tests check it). F64 > F32 > BF16 > F16 in every version.
SERIALIZE_ORDER = (
    "U64",
    "I64",
    "F64",
    "C64",
    "F32",
    "U32",
    "I32",
    "BF16",
    "F16",
    "U16",
    "I16",
    "F8_E5M2FNUZ",
    "F8_E4M3FNUZ",
    "F8_E4M3",
    "F8_E5M2",
    "I8",
    "U8",
    "BOOL",
)
_RANK = {name: i for i, name in enumerate(SERIALIZE_ORDER)}
#: the metadata ``storage.save_state_dict`` adds, and the length of each value (hex digests)
HASH_KEYS = {"sshs_model_hash": 64, "sshs_legacy_hash": 8}

TensorSpec = Union[torch.Tensor, tuple]  # a tensor, or (dtype, shape)


def _spec(value: TensorSpec) -> tuple[torch.dtype, tuple[int, ...]]:
    if isinstance(value, torch.Tensor):
        return value.dtype, tuple(value.shape)
    dtype, shape = value
    return dtype, tuple(int(d) for d in shape)


@functools.lru_cache(maxsize=None)
def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def _layout(tensors: Mapping[str, TensorSpec], metadata: Optional[Mapping[str, str]]) -> tuple[bytes, int]:
    """(padded header, bytes of tensor data) of ``safetensors.torch.save(tensors, metadata)``."""
    specs = {str(name): _spec(value) for name, value in tensors.items()}
    unknown = sorted({str(dtype) for dtype, _ in specs.values() if dtype not in DTYPE_NAMES})
    if unknown:
        raise ValueError(f"dtype(s) {', '.join(unknown)} cannot be stored in safetensors")
    order = sorted(specs, key=lambda name: (_RANK[DTYPE_NAMES[specs[name][0]]], name))
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        size = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8), offset


def safetensors_header(tensors: Mapping[str, TensorSpec], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The header bytes (JSON padded with spaces to a multiple of 8, without the 8-byte length) that
    ``safetensors.torch.save(tensors, metadata)`` writes; ``tensors`` may give (dtype, shape) pairs.

    Metadata keys may come in another order in the real file (the serializer's own map order); the
    length, all that :func:`safetensors_size` needs, does not depend on it.
    """
    return _layout(tensors, metadata)[0]


def tensor_bytes(tensors: Mapping[str, TensorSpec]) -> int:
    """Bytes of the tensors' data."""
    total = 0
    for value in tensors.values():
        dtype, shape = _spec(value)
        total += math.prod(shape) * itemsize(dtype)
    return total


def safetensors_size(tensors: Mapping[str, TensorSpec], metadata: Optional[Mapping[str, str]] = None) -> int:
    """Size in bytes of the file ``safetensors.torch.save(tensors, metadata)`` writes."""
    header, data = _layout(tensors, metadata)
    return 8 + len(header) + data


def saved_metadata(metadata: Optional[Mapping[str, str]]) -> dict[str, str]:
    """The metadata ``storage.save_state_dict`` writes for ``metadata``, its sshs hashes as placeholders of the
    hashes' (fixed) lengths."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({key: "0" * length for key, length in HASH_KEYS.items()})
    return meta


def saved_file_size(tensors: Mapping[str, TensorSpec], metadata: Optional[Mapping[str, str]] = None) -> int:
    """Size in bytes of the .safetensors file ``storage.save_state_dict(path, tensors, metadata)`` writes."""
    return safetensors_size(tensors, saved_metadata(metadata))


# --- one module's tensors -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleLayout:
    """The tensors a kohya LoRA module writes at rank k, as ``resize`` and ``export`` write them.

    ``name.lora_down.weight`` (k, in) or (k, in, kh, kw), ``name.lora_up.weight`` (out, k) or
    (out, k, 1, 1), and the scalar ``name.alpha``, all in ``dtype``.
    """

    name: str
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float16

    @classmethod
    def from_shapes(
        cls, name: str, down_shape: Sequence[int], up_shape: Sequence[int], dtype: torch.dtype
    ) -> "ModuleLayout":
        """From the module's lora_down / lora_up shapes (any rank), as stored in a file."""
        return cls(name, int(down_shape[1]), int(up_shape[0]), tuple(int(d) for d in down_shape[2:]), dtype)

    def tensors(self, rank: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """{key: (dtype, shape)} at ``rank``."""
        return {
            f"{self.name}.lora_down.weight": (self.dtype, (rank, self.in_features) + self.kernel),
            f"{self.name}.lora_up.weight": (self.dtype, (self.out_features, rank) + (1,) * len(self.kernel)),
            f"{self.name}.alpha": (self.dtype, ()),
        }

    @property
    def component_bytes(self) -> int:
        """Bytes one kept component costs: a row of down and a column of up."""
        return (self.in_features * math.prod(self.kernel) + self.out_features) * itemsize(self.dtype)


def layout_tensors(layouts: Sequence[ModuleLayout], ranks: Sequence[int]) -> dict[str, TensorSpec]:
    """{key: (dtype, shape)} of the whole file at ``ranks``."""
    out: dict[str, TensorSpec] = {}
    for layout, rank in zip(layouts, ranks):
        out.update(layout.tensors(int(rank)))
    return out


#: a file's metadata: none, a dict, or a function of {module name: rank} returning exactly what is written
MetadataSource = Union[None, Mapping[str, str], Callable[[dict[str, int]], Mapping[str, str]]]


@dataclass(frozen=True)
class FileLayout:
    """What a LoRA file holds at any ranks: every module's tensors and its metadata, written by
    ``storage.save_state_dict`` (sshs hashes added). ``metadata`` may depend on the ranks (e.g.
    ``aclora_ranks``): a function of {module name: rank} that returns exactly what will be written."""

    modules: Sequence[ModuleLayout]
    metadata: MetadataSource = None

    @property
    def names(self) -> list[str]:
        return [layout.name for layout in self.modules]

    def metadata_at(self, ranks: Sequence[int]) -> Optional[Mapping[str, str]]:
        """The metadata written with ``ranks`` (one per module, in order)."""
        if callable(self.metadata):
            return self.metadata(dict(zip(self.names, (int(k) for k in ranks))))
        return self.metadata

    def size(self, ranks: Sequence[int]) -> int:
        """The exact size in bytes of the file at ``ranks``: header, metadata and hashes included."""
        return saved_file_size(layout_tensors(self.modules, ranks), self.metadata_at(ranks))


__all__ = [
    "DTYPE_NAMES",
    "SERIALIZE_ORDER",
    "HASH_KEYS",
    "TensorSpec",
    "safetensors_header",
    "safetensors_size",
    "tensor_bytes",
    "saved_metadata",
    "saved_file_size",
    "ModuleLayout",
    "layout_tensors",
    "MetadataSource",
    "FileLayout",
    "itemsize",
]
