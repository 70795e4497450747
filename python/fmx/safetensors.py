"""Read and write the standard safetensors layout with torch and numpy only.

Layout: 8-byte little-endian header length N, N bytes of JSON header
(`{"__metadata__": {...}, "KEY": {"dtype", "shape", "data_offsets"}}`), then the
data; offsets are relative to the end of the header. The header is padded with
spaces so the data starts on an 8-byte boundary, header keys are sorted, and
tensors are laid out by element size, largest first, so every tensor starts on a
multiple of its own element size; tensors are contiguous with no gaps, as the
reference implementation requires.

`save_file` writes a dict at once; `Writer` streams tensors to per-size part
files as they arrive (the exporter's captures) and assembles the file at close.
`load_file` maps the file copy-on-write. This module is not the `safetensors`
package and has no dependency on it; bfloat16 goes through int16 because numpy
has no bfloat16.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from typing import Any, BinaryIO, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

# safetensors dtype name -> (torch dtype, numpy dtype used for the bytes)
_DTYPES: Dict[str, Tuple[torch.dtype, Any]] = {
    "F64": (torch.float64, np.float64),
    "F32": (torch.float32, np.float32),
    "F16": (torch.float16, np.float16),
    "BF16": (torch.bfloat16, np.int16),
    "I64": (torch.int64, np.int64),
    "I32": (torch.int32, np.int32),
    "I16": (torch.int16, np.int16),
    "I8": (torch.int8, np.int8),
    "U8": (torch.uint8, np.uint8),
    "BOOL": (torch.bool, np.bool_),
}
_NAMES: Dict[torch.dtype, str] = {t: name for name, (t, _) in _DTYPES.items()}
_SIZES = (8, 4, 2, 1)  # data layout order: element size, largest first


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("F32", "BF16", ...)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"safetensors: unsupported dtype {dtype}") from None


def is_storable(tensor: torch.Tensor) -> bool:
    """Whether `save_file`/`Writer` can store the tensor (a dense tensor of a supported dtype)."""
    return tensor.dtype in _NAMES and tensor.layout == torch.strided and not tensor.is_quantized


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A flat uint8 view of the tensor's data in row-major order (CPU copy if needed)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view(np.uint8)


def _header_bytes(entries: Mapping[str, Dict[str, Any]], metadata: Optional[Mapping[str, str]]) -> bytes:
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for key in sorted(entries):
        header[key] = entries[key]
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def save_file(tensors: Mapping[str, torch.Tensor], path: str, metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write `tensors` to `path`; returns the number of data bytes.

    Each tensor is converted to bytes only while it is written, so the peak extra
    memory is one tensor.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries: Dict[str, Dict[str, Any]] = {}
    offset = 0
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        entries[key] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    with open(path, "wb") as f:
        f.write(_header_bytes(entries, metadata))
        for key in order:
            f.write(tensor_bytes(tensors[key]).data)
    return offset


class Writer:
    """Streaming writer: `add` tensors as they come, `close` to assemble `path`.

    Data goes to part files `path.partN` (one per element size) beside `path`
    until close; nothing but the dedupe index is held in memory. With
    `dedupe=True`, `add` returns the key of an earlier tensor with the same
    dtype, shape and bytes instead of storing a copy.
    """

    def __init__(self, path: str, metadata: Optional[Mapping[str, str]] = None) -> None:
        self.path = path
        self.metadata = dict(metadata or {})
        self.nbytes = 0
        self._entries: Dict[str, Dict[str, Any]] = {}  # key -> dtype, shape, size, start within its part
        self._parts: Dict[int, BinaryIO] = {}
        self._part_sizes: Dict[int, int] = {}
        self._digests: Dict[Tuple[str, Tuple[int, ...], bytes], str] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: str, tensor: torch.Tensor, dedupe: bool = False) -> str:
        """Store `tensor` under `key`; returns the key it is stored under."""
        if key in self._entries:
            raise KeyError(f"safetensors: duplicate key {key!r}")
        name = dtype_name(tensor.dtype)
        shape = tuple(int(s) for s in tensor.shape)
        data = tensor_bytes(tensor)
        if dedupe:
            ident = (name, shape, hashlib.blake2b(data.data, digest_size=20).digest())
            if ident in self._digests:
                return self._digests[ident]
            self._digests[ident] = key
        size = tensor.element_size()
        part = self._parts.get(size)
        if part is None:
            part = self._parts[size] = open(f"{self.path}.part{size}", "wb")
            self._part_sizes[size] = 0
        start = self._part_sizes[size]
        part.write(data.data)
        self._part_sizes[size] = start + data.size
        self._entries[key] = {"dtype": name, "shape": list(shape), "size": size, "start": start, "end": start + data.size}
        self.nbytes += data.size
        return key

    def close(self) -> int:
        """Assemble the file and remove the part files; returns the data bytes."""
        base = {}
        offset = 0
        for size in _SIZES:
            base[size] = offset
            offset += self._part_sizes.get(size, 0)
        entries = {
            key: {"dtype": e["dtype"], "shape": e["shape"],
                  "data_offsets": [base[e["size"]] + e["start"], base[e["size"]] + e["end"]]}
            for key, e in self._entries.items()
        }
        for part in self._parts.values():
            part.close()
        with open(self.path, "wb") as f:
            f.write(_header_bytes(entries, self.metadata))
            for size in _SIZES:
                if size in self._parts:
                    with open(f"{self.path}.part{size}", "rb") as src:
                        shutil.copyfileobj(src, f, 1 << 22)
        self._remove_parts()
        return offset

    def abort(self) -> None:
        """Drop everything written so far (part files and any output)."""
        for part in self._parts.values():
            part.close()
        self._remove_parts()
        if os.path.exists(self.path):
            os.remove(self.path)

    def _remove_parts(self) -> None:
        for size in list(self._parts):
            part_path = f"{self.path}.part{size}"
            if os.path.exists(part_path):
                os.remove(part_path)
        self._parts.clear()


def read_header(path: str) -> Tuple[Dict[str, Any], int]:
    """The parsed JSON header (with `__metadata__` if any) and the data start offset."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file")
        header = json.loads(f.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    return header, 8 + n


def load_file(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of `path`, keyed as stored, backed by a copy-on-write map of the file."""
    header, start = read_header(path)
    header.pop("__metadata__", None)
    size = os.path.getsize(path)
    out: Dict[str, torch.Tensor] = {}
    if not header:
        return out
    data = np.memmap(path, dtype=np.uint8, mode="c") if size > 0 else np.zeros(0, np.uint8)
    for key, info in header.items():
        name = info["dtype"]
        if name not in _DTYPES:
            raise ValueError(f"{path}: {key}: unsupported dtype {name}")
        tdtype, ndtype = _DTYPES[name]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        itemsize = np.dtype(ndtype).itemsize
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * itemsize or start + end > size or begin > end:
            raise ValueError(f"{path}: {key}: data_offsets {begin}..{end} do not fit shape {list(shape)} {name}")
        raw = data[start + begin:start + end]
        if (start + begin) % itemsize:
            raw = raw.copy()  # unaligned: numpy views need aligned data for torch
        arr = raw.view(ndtype).reshape(shape)
        t = torch.from_numpy(arr)
        if tdtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        out[key] = t
    return out
