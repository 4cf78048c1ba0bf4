"""Reading and writing PyTorch ``.pth`` state dicts without torch.

A ``.pth`` is what ``torch.save(state_dict, path)`` writes: an uncompressed zip archive holding
``data.pkl`` (a protocol-2 pickle of ``{name: torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, requires_grad, backward_hooks)}`` whose storages are persistent ids), one raw
little-endian file per storage under ``data/``, and small ``version`` / ``byteorder`` records.
The pickle is emitted opcode by opcode here, so no torch import is needed (JAX code never imports
torch at run time); ``torch.load(path, weights_only=True)`` reads it, as the tests check.
Each record's bytes start at a multiple of 64, as torch aligns them (so ``mmap=True`` works too).

``read_pth`` is the inverse for any file in that zip format (torch >= 1.6's default, so every
arcface_torch ``backbone.pth`` and ``pytorch_model.bin``): a restricted unpickler that, like
``torch.load(weights_only=True)``, builds nothing but dicts, tuples, lists, scalars and tensors, and
refuses any other class by name -- a weight file cannot run code.  So the JAX side reads ``.pth``
weights on the core install, and a training child does not pay torch's import for one file.
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mema_jax.fileio import atomic_file

# numpy dtype -> the torch storage class torch.load rebuilds it with.
STORAGE_CLASSES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage", np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}
ALIGNMENT = 64
ARCHIVE = "archive"  # the folder name inside the zip (torch uses the file's stem; any name loads)

# pickle opcodes (protocol 2)
_PROTO, _EMPTY_DICT, _MARK, _SETITEMS, _STOP = b"\x80\x02", b"}", b"(", b"u", b"."
_TUPLE, _EMPTY_TUPLE, _BINPERSID, _REDUCE, _NEWFALSE = b"t", b")", b"Q", b"R", b"\x89"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _tuple(values) -> bytes:
    values = tuple(values)
    return _EMPTY_TUPLE if not values else _MARK + b"".join(_int(v) for v in values) + _TUPLE


def _pickle(entries: list[tuple[str, str, np.ndarray]]) -> bytes:
    """data.pkl for (name, storage key, array) entries, each array its own storage."""
    out = [_PROTO, _EMPTY_DICT, _MARK]
    for name, key, array in entries:
        strides = []
        step = 1
        for dim in reversed(array.shape):  # C-contiguous strides in elements
            strides.append(step)
            step *= dim
        storage = (_MARK + _str("storage") + _global("torch", STORAGE_CLASSES[array.dtype]) + _str(key) + _str("cpu")
                   + _int(array.size) + _TUPLE + _BINPERSID)
        hooks = _global("collections", "OrderedDict") + _EMPTY_TUPLE + _REDUCE
        args = _MARK + storage + _int(0) + _tuple(array.shape) + _tuple(reversed(strides)) + _NEWFALSE + hooks + _TUPLE
        out += [_str(name), _global("torch._utils", "_rebuild_tensor_v2"), args, _REDUCE]
    out += [_SETITEMS, _STOP]
    return b"".join(out)


def _write_aligned(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed date: same tensors, same bytes
    info.compress_type = zipfile.ZIP_STORED
    header = 30 + len(name.encode())  # local file header without the extra field
    pad = -(archive.fp.tell() + header + 4) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad  # an extra block of padding, as torch writes
    archive.writestr(info, data)


def write_pth(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes ``tensors`` (name -> numpy array, in this order) as a torch ``.pth`` state dict,
    atomically.  dtypes: those of ``STORAGE_CLASSES`` (a bfloat16 array is refused: cast it)."""
    entries = []
    for i, (name, value) in enumerate(tensors.items()):
        array = np.asarray(value)
        array = array if array.flags.c_contiguous else array.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
        if array.dtype not in STORAGE_CLASSES:
            raise TypeError(f"{name}: dtype {array.dtype} has no torch storage here; expected one of "
                            f"{sorted(str(d) for d in STORAGE_CLASSES)}")
        entries.append((str(name), str(i), array.astype(array.dtype.newbyteorder("<"), copy=False)))
    with atomic_file(Path(path)) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            _write_aligned(archive, f"{ARCHIVE}/data.pkl", _pickle(entries))
            _write_aligned(archive, f"{ARCHIVE}/.format_version", b"1")
            _write_aligned(archive, f"{ARCHIVE}/.storage_alignment", str(ALIGNMENT).encode())
            _write_aligned(archive, f"{ARCHIVE}/byteorder", b"little")
            for _, key, array in entries:
                _write_aligned(archive, f"{ARCHIVE}/data/{key}", array.tobytes())
            _write_aligned(archive, f"{ARCHIVE}/version", b"3\n")


# ----------------------------------------------------------------------------------------------
# Reading.


class PthFormatError(ValueError):
    """A file is not a torch zip-format state dict this reader can build (the message says why)."""


def _storage_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    dtypes = {name: dtype for dtype, name in STORAGE_CLASSES.items()}
    dtypes["BFloat16Storage"] = np.dtype(ml_dtypes.bfloat16)
    return dtypes


class _StorageClass:
    """Stands for ``torch.<X>Storage`` inside the pickle: only its element dtype matters here."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    size, stride = tuple(int(d) for d in size), tuple(int(s) for s in stride)
    last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))  # the last element read
    if all(d > 0 for d in size) and not 0 <= last < storage.size:
        raise PthFormatError(f"a tensor of size {size} and stride {stride} at offset {storage_offset} "
                             f"reads past its storage of {storage.size} elements")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return np.array(view, copy=True, order="C")  # C-contiguous, owning its memory, the archive can close


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *metadata):
    return data


# (module, name) -> what the restricted unpickler gives for it; anything else is refused.
def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }
    for name, dtype in _storage_dtypes().items():
        allowed[("torch", name)] = _StorageClass(name, dtype)
    return allowed


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._allowed = _allowed_globals()
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise PthFormatError(f"it needs {module}.{name}, which a weights-only load does not build "
                                 "(only dicts, tensors and plain values)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageClass)):
            raise PthFormatError(f"unknown persistent id {pid!r:.80}")
        _, storage_class, key, _location, numel = pid
        if key not in self._storages:
            record = f"{self._prefix}data/{key}"
            try:
                data = self._archive.read(record)
            except KeyError:
                raise PthFormatError(f"its pickle names storage {key}, but {record} is not in the archive") from None
            dtype = storage_class.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(data) != numel * dtype.itemsize:
                raise PthFormatError(f"{record} holds {len(data)} bytes, not {numel} x {dtype.itemsize}")
            self._storages[key] = np.frombuffer(data, dtype=dtype).astype(storage_class.dtype, copy=False)
        return self._storages[key]


def read_pth(path: str | os.PathLike) -> object:
    """What ``torch.load(path, weights_only=True)`` returns for a zip-format ``.pth`` / ``.bin`` /
    ``.ckpt``, with numpy arrays for tensors.  PthFormatError names the problem (a legacy
    pre-1.6 pickle, a class a weights-only load refuses, a truncated record)."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise PthFormatError("not a zip archive: a legacy (torch < 1.6) pickle or not a torch file at all")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise PthFormatError(f"expected one <folder>/data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        except KeyError:
            byteorder = "little"  # files older than the record are little-endian
        with archive.open(pickles[0]) as f:
            try:
                return _Unpickler(f, archive, prefix, byteorder).load()
            except PthFormatError:
                raise
            except Exception as err:  # a corrupt pickle raises many types
                raise PthFormatError(f"cannot unpickle {pickles[0]}: {type(err).__name__}: {err}") from err
