"""The IDX file format of MNIST and its relatives, read and written through numpy.

An IDX file is a 4-byte magic number ``00 00 <dtype code> <ndim>``, then ``ndim`` big-endian
uint32 dimensions, then the values in C order (big-endian for multi-byte types). Files may be
gzipped; gzip is recognised by its content, not by the file name.

Reading decodes the whole payload with one ``np.frombuffer`` call: no per-sample Python.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dlkit.errors import DataError

if TYPE_CHECKING:
    import torch

# IDX type code -> numpy dtype of the values on disk (big-endian).
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("=") if dt.itemsize > 1 else dt: code for code, dt in DTYPES.items()}

_GZIP_MAGIC = b"\x1f\x8b"
_HINT = "the file is damaged or incomplete; delete it so it is found elsewhere or downloaded again"


def read_idx_bytes(path: str | Path) -> bytes:
    """The decompressed content of an IDX file (gzipped or not)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    if not data.startswith(_GZIP_MAGIC):
        return data
    parts = []
    rest = data
    try:
        while rest.startswith(_GZIP_MAGIC):  # a gzip file may hold several members
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            parts.append(d.decompress(rest))
            if not d.eof:
                raise DataError(f"{path} is a truncated gzip file", hint=_HINT)
            rest = d.unused_data
    except zlib.error as err:
        raise DataError(f"{path} is not a valid gzip file ({err})", hint=_HINT) from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a native-endian numpy array, checking the header and the size."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{name} is not an IDX file (bad magic number {data[:4].hex() or 'none'})",
                        hint=_HINT)
    code, ndim = data[2], data[3]
    if code not in DTYPES:
        raise DataError(f"{name} has an unknown IDX type code 0x{code:02x}", hint=_HINT)
    if ndim == 0:
        raise DataError(f"{name} declares zero dimensions", hint=_HINT)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name} is truncated inside its header", hint=_HINT)
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataError(
            f"{name} is {what}: shape {'x'.join(map(str, dims))} needs {expected} bytes of data, "
            f"found {found}",
            hint=_HINT,
        )
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    # One copy: native byte order and writable, so torch can share it without warnings.
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> "torch.Tensor":
    """Read an IDX file (``.gz`` or raw) into a tensor with the file's dtype and shape."""
    import torch

    return torch.from_numpy(parse_idx(read_idx_bytes(path), str(path)))


def write_idx(path: str | Path, array) -> Path:
    """Write a numpy array or tensor as an IDX file; gzipped when the name ends in ``.gz``."""
    path = Path(path)
    arr = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    native = arr.dtype.newbyteorder("=") if arr.dtype.itemsize > 1 else arr.dtype
    if native not in _CODES:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    if arr.ndim == 0 or arr.ndim > 255:
        raise ValueError("IDX needs between 1 and 255 dimensions")
    code = _CODES[native]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path
