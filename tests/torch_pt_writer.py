"""Write ``torch.save``-compatible checkpoints from numpy arrays, without torch.

Test helper only. The file layout is torch's zip format: ``<name>/data.pkl`` (a
protocol-2 pickle whose tensors point at storages by persistent id),
``<name>/data/<key>`` (raw little-endian storage bytes), ``<name>/version`` and
``<name>/byteorder``. The pickle is emitted opcode by opcode so that it names
torch's globals (``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``, ...)
without importing torch.
"""

import struct
import zipfile
from typing import Dict, Iterable

import numpy as np

STORAGES = {"float32": "FloatStorage", "bfloat16": "BFloat16Storage", "float16": "HalfStorage"}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """The float32 values a bf16 checkpoint of ``x`` holds."""
    return from_bf16_bits(to_bf16_bits(x)).reshape(np.shape(x))


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        return to_bf16_bits(x).astype("<u2").tobytes()
    if dtype == "float16":
        return np.asarray(x, "<f2").tobytes()
    return np.asarray(x, "<f4").tobytes()


class _Pickle:
    """Just enough of the pickle protocol 2 opcodes to spell a state dict."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def global_(self, module: str, name: str):
        self.out += b"c" + f"{module}\n{name}\n".encode()

    def mark(self):
        self.out += b"("

    def tuple_(self):
        self.out += b"t"

    def empty_tuple(self):
        self.out += b")"

    def reduce(self):
        self.out += b"R"

    def setitems(self):
        self.out += b"u"

    def persid(self):
        self.out += b"Q"

    def false(self):
        self.out += b"\x89"

    def int_(self, n: int):
        self.out += b"J" + struct.pack("<i", n)

    def str_(self, s: str):
        data = s.encode()
        self.out += b"X" + struct.pack("<I", len(data)) + data

    def ints(self, values: Iterable[int]):
        self.mark()
        for v in values:
            self.int_(v)
        self.tuple_()

    def ordered_dict(self):
        self.global_("collections", "OrderedDict")
        self.empty_tuple()
        self.reduce()

    def stop(self) -> bytes:
        return bytes(self.out + b".")


def _tensor(p: _Pickle, storage: str, key: str, numel: int, offset, shape, stride):
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
    p.global_("torch._utils", "_rebuild_tensor_v2")
    p.mark()
    p.mark()  # persistent id: ("storage", torch.XStorage, key, "cpu", numel)
    p.str_("storage")
    p.global_("torch", storage)
    p.str_(key)
    p.str_("cpu")
    p.int_(numel)
    p.tuple_()
    p.persid()
    p.int_(offset)
    p.ints(shape)
    p.ints(stride)
    p.false()
    p.ordered_dict()
    p.tuple_()
    p.reduce()


def _contiguous_strides(shape) -> list:
    strides, n = [], 1
    for size in reversed(shape):
        strides.insert(0, n)
        n *= size
    return strides


def _write_zip(path, name: str, pkl: bytes, storages: Dict[str, bytes]):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/data.pkl", pkl)
        zf.writestr(f"{name}/byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"{name}/data/{key}", data)
        zf.writestr(f"{name}/version", "3\n")


def save_state_dict(
    path,
    tensors: Dict[str, np.ndarray],
    dtype: str = "float32",
    *,
    shared_storage: bool = False,
    column_major: bool = False,
    name: str = "archive",
):
    """Write ``tensors`` as a ``torch.save(state_dict)`` zip file.

    ``dtype`` is the stored precision (float32, bfloat16 or float16).
    ``shared_storage`` packs all tensors into one storage at increasing offsets;
    ``column_major`` stores 2-D tensors transposed with swapped strides (the
    layout of ``w.t()``), so readers must honour offsets and strides.
    """
    # Lay out the storages first: (key, storage key, offset, shape, stride).
    entries, storages = [], {}
    shared, shared_numel = [], 0
    for i, (key, value) in enumerate(tensors.items()):
        value = np.asarray(value, dtype=np.float32)
        shape, stride, flat = list(value.shape), _contiguous_strides(value.shape), value
        if column_major and value.ndim == 2:
            flat, stride = value.T, [1, value.shape[0]]
        data = _encode(np.ascontiguousarray(flat).reshape(-1), dtype)
        if shared_storage:
            entries.append((key, "0", shared_numel, shape, stride))
            shared.append(data)
            shared_numel += value.size
        else:
            entries.append((key, str(i), 0, shape, stride))
            storages[str(i)] = data
    if shared_storage:
        storages["0"] = b"".join(shared)
    itemsize = 4 if dtype == "float32" else 2

    p = _Pickle()
    p.ordered_dict()
    p.mark()
    for key, skey, offset, shape, stride in entries:
        p.str_(key)
        numel = len(storages[skey]) // itemsize
        _tensor(p, STORAGES[dtype], skey, numel, offset, shape, stride)
    p.setitems()
    _write_zip(path, name, p.stop(), storages)


def save_malicious(path, command: str, name: str = "archive"):
    """A torch-style zip whose pickle calls ``os.system(command)`` when loaded unsafely."""
    p = _Pickle()
    p.global_("os", "system")
    p.mark()
    p.str_(command)
    p.tuple_()
    p.reduce()
    _write_zip(path, name, p.stop(), {})
