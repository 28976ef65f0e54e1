"""Reading and writing LoRA files: safetensors (or torch pickles), atomically, with sd-scripts' hashes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tempfile
from typing import Any, Mapping, Optional

import torch


class LoRAFileError(ValueError):
    """A file that is not a usable LoRA file (missing, not safetensors, truncated, inconsistent)."""


def _safetensors_header(path: str) -> dict:
    """Parse and sanity-check the safetensors header, raising LoRAFileError with the reason."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise LoRAFileError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
            raise LoRAFileError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoRAFileError(f"{path}: not a safetensors file (its header is not JSON)") from None
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or "data_offsets" not in info:
            raise LoRAFileError(f"{path}: damaged safetensors header at tensor {key!r}")
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise LoRAFileError(f"{path}: truncated file ({size} bytes, its header describes {8 + n + end})")
    return header


def read_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} for other formats)."""
    check_path(path)
    if not path.endswith(".safetensors"):
        return {}
    return dict(_safetensors_header(path).get("__metadata__", {}) or {})


def metadata_json(meta: Mapping[str, str], key: str, source: str, kind: type) -> Any:
    """A JSON metadata field parsed and type-checked (None when absent or empty)."""
    raw = meta.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise LoRAFileError(f"{source}: metadata field {key} is not valid JSON ({raw[:40]!r}...)") from None
    if not isinstance(value, kind):
        raise LoRAFileError(
            f"{source}: metadata field {key} should be a JSON {kind.__name__}, found {type(value).__name__}"
        )
    return value


def metadata_ranks(meta: Mapping[str, str], source: str) -> dict[str, int]:
    """Every module's signal rank (module name -> rank) from the metadata, {} when absent.

    ``aclora_ranks`` holds the ranks as stored; a module that export padded to its part's common rank
    is stored above its rank with zero components and ``aclora_padded`` holds its own rank: the one the
    run chose, which ``ranks_from`` and loading must see.
    """
    return {**_rank_field(meta, "aclora_ranks", source), **_rank_field(meta, "aclora_padded", source)}


def _rank_field(meta: Mapping[str, str], key: str, source: str) -> dict[str, int]:
    ranks = metadata_json(meta, key, source, dict) or {}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ranks.values()):
        raise LoRAFileError(f"{source}: metadata field {key} should map module names to positive integer ranks")
    return ranks


def check_path(path: str) -> None:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise LoRAFileError(f"LoRA file path {path!r} is not a path")
    if os.path.isdir(path):
        raise LoRAFileError(f"{path}: is a directory; give the path of a .safetensors LoRA file")
    if not os.path.exists(path):
        raise LoRAFileError(f"{path}: no such file")


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file (.safetensors; .ckpt/.pt/.bin through torch.load), on the CPU."""
    path = os.fspath(path)
    check_path(path)
    if path.endswith(".safetensors"):
        _safetensors_header(path)
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise LoRAFileError(f"{path}: cannot read safetensors file ({err})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LoRAFileError(f"{path}: neither a safetensors file nor a torch checkpoint ({err})") from None
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoRAFileError(f"{path}: a torch file, but not a state dict of tensors")
    return dict(data)


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``sshs_model_hash`` and ``sshs_legacy_hash`` exactly as sd-scripts computes them.

    Both are taken over the file that would be written with only the ``ss_*``
    metadata: the model hash is the sha256 of everything after the header, the
    legacy hash the first 8 hex digits of the sha256 of the 64 KiB at 1 MiB.
    """
    from safetensors.torch import save

    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", blob[:8])
    model_hash = hashlib.sha256(blob[8 + n :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def write_atomic(path: str, payload: bytes) -> None:
    """Write ``payload`` to a temp file beside ``path``, fsync it, then rename over ``path``.

    An interrupted save leaves the previous file untouched (and at most a
    ``.tmp`` file beside it that is removed on the next failure path).
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class OversizeError(LoRAFileError):
    """A file that came out larger than the size it was sized for: not written (the prediction of
    ``sizes.saved_file_size`` no longer matches the installed serializer)."""


def save_state_dict(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Optional[Mapping[str, str]],
    max_size: Optional[int] = None,
) -> None:
    """Save LoRA tensors: safetensors with metadata and sshs hashes, or torch.save for other suffixes.

    ``max_size``: the safetensors file was sized to fit it (``fit.fit_ranks``); a larger one is not
    written (OversizeError), so a serializer that changed its layout fails loudly instead.
    """
    path = os.fspath(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(tensors, meta)
        payload = save(tensors, meta)
        if max_size is not None and len(payload) > max_size:
            raise OversizeError(
                f"{path}: not written: the file would be {len(payload):,} bytes, more than the "
                f"{max_size:,} bytes it was sized for"
            )
        write_atomic(path, payload)
    else:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        write_atomic(path, buffer.getvalue())
