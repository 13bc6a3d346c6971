"""A minimal GGUF reader: enough to refuse a file that is not a GGUF, to describe a model, and
to read the tensors `llama-results` writes (tokens, logits) without trusting any tool's verdict.

Format: magic "GGUF", version (uint32), tensor count and metadata count (uint64), the metadata
(key, type, value), the tensor infos (name, dims, type, offset), then the data, aligned.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# metadata value types -> struct format (8: string, 9: array are read by hand)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml tensor types this reader can hand out as arrays
_DTYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}

# ggml tensor type ids -> the names ggml prints (test-backend-ops' "type_a=q4_K")
TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 9: "q8_1", 10: "q2_K",
              11: "q3_K", 12: "q4_K", 13: "q5_K", 14: "q6_K", 15: "q8_K", 16: "iq2_xxs", 17: "iq2_xs",
              18: "iq3_xxs", 19: "iq1_s", 20: "iq4_nl", 21: "iq3_s", 22: "iq2_s", 23: "iq4_xs", 24: "i8",
              25: "i16", 26: "i32", 27: "i64", 28: "f64", 29: "iq1_m", 30: "bf16", 34: "tq1_0", 35: "tq2_0",
              39: "mxfp4"}


class NotGGUF(ValueError):
    """The file is not a GGUF model (wrong magic, unknown version, truncated or malformed)."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_offset: int = 0

    def type_names(self) -> list[str]:
        """The ggml types of the model's tensors, by name, sorted."""
        return sorted({TYPE_NAMES.get(t.ggml_type, str(t.ggml_type)) for t in self.tensors.values()})

    def array(self, name: str) -> np.ndarray:
        """A tensor of a plain type as a numpy array (memory-mapped, row-major ggml order)."""
        info = self.tensors.get(name)
        if info is None:
            raise NotGGUF(f"{self.path} has no tensor '{name}'")
        if info.ggml_type not in _DTYPES:
            raise NotGGUF(f"tensor '{name}' of {self.path} has ggml type {info.ggml_type}, not a plain type")
        count = int(np.prod(info.shape)) if info.shape else 1
        arr = np.memmap(self.path, dtype=_DTYPES[info.ggml_type], mode="r",
                        offset=self.data_offset + info.offset, shape=(count,))
        return arr.reshape(tuple(reversed(info.shape)))  # ggml's ne[0] is the fastest axis


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise NotGGUF(f"{self.path} ends inside its header (truncated?)")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.data):
            raise NotGGUF(f"{self.path} ends inside a string of its header (truncated?)")
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.take("<I"), self.take("<Q")
            if etype in _SCALARS:  # numbers: skip in one step, keep only the length
                self.pos += struct.calcsize(_SCALARS[etype]) * n
                if self.pos > len(self.data):
                    raise NotGGUF(f"{self.path} ends inside an array of its header (truncated?)")
                return {"array_of": etype, "length": n}
            items = [self.value(etype) for _ in range(n)]
            return items if n <= 64 else {"array_of": etype, "length": n}
        raise NotGGUF(f"{self.path} has an unknown metadata type {vtype}")


def read(path: Path | str) -> GGUFFile:
    """Parse the header of a GGUF file; raise NotGGUF with the reason when it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head != MAGIC:
                raise NotGGUF(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r})")
            size = path.stat().st_size
            data = np.memmap(path, dtype=np.uint8, mode="r") if size else b""
    except OSError as exc:
        raise NotGGUF(f"{path} cannot be read: {exc}") from None
    r = _Reader(memoryview(data), path)
    r.pos = 4
    version = r.take("<I")
    if version not in (2, 3):
        raise NotGGUF(f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise NotGGUF(f"{path} claims {n_tensors} tensors and {n_kv} metadata keys: not a GGUF file")
    out = GGUFFile(path=path, version=version)
    for _ in range(n_kv):
        key = r.string()
        out.metadata[key] = r.value(r.take("<I"))
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.take("<I")
        if n_dims > 8:
            raise NotGGUF(f"{path}: tensor '{name}' has {n_dims} dimensions")
        shape = tuple(r.take("<Q") for _ in range(n_dims))
        out.tensors[name] = TensorInfo(name, shape, r.take("<I"), r.take("<Q"))
    alignment = int(out.metadata.get("general.alignment", DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT)
    out.data_offset = (r.pos + alignment - 1) // alignment * alignment
    if out.data_offset > len(data):
        raise NotGGUF(f"{path} ends before its tensor data (truncated?)")
    return out
