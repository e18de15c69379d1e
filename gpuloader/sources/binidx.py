"""Megatron-LM indexed datasets: a ``.bin`` of tokens and a ``.idx`` saying where each is.

``.idx`` layout (little-endian): the 9 bytes ``MMIDIDX\\x00\\x00``, version u64 (1), dtype code
u8, sequence count u64, document count u64, then ``sizes`` int32[sequences] (tokens per
sequence), ``pointers`` int64[sequences] (byte offset of each sequence in ``.bin``) and the
document index int64[documents].  Dtype codes follow Megatron-LM's ``DType`` enum: 1 uint8,
2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16.  Each sequence is one sample
of the ragged field "tokens"; the ``.bin`` is memory-mapped and read like any flat file.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Tuple, Union

import numpy as np

from gpuloader.errors import SourceError, SourceNotFoundError
from gpuloader.sources.npy import FlatFile, NpySource
from gpuloader.sources.ragged import SpanColumn

PathLike = Union[str, "os.PathLike[str]"]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
#: Megatron-LM's dtype codes (megatron/core/datasets/indexed_dataset.py, ``DType``).
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")


def code_of(dtype: np.dtype) -> int:
    """The Megatron dtype code of ``dtype``; SourceError if it has none."""
    for code, dt in DTYPE_CODES.items():
        if np.dtype(dt) == np.dtype(dtype):
            return code
    raise SourceError(
        f"dtype {np.dtype(dtype)} has no Megatron code; use one of "
        f"{[np.dtype(d).name for d in DTYPE_CODES.values()]}")


def pair_paths(path: PathLike) -> Tuple[Path, Path]:
    """``(bin, idx)`` for a prefix or either file's path (existence not checked)."""
    p = Path(os.fspath(path))
    base = p.with_suffix("") if p.suffix in (".bin", ".idx") else p
    return Path(str(base) + ".bin"), Path(str(base) + ".idx")


def is_binidx(path: PathLike) -> bool:
    """True when ``path`` is a prefix, ``.bin`` or ``.idx`` of an existing pair."""
    bin_path, idx_path = pair_paths(path)
    return bin_path.is_file() and idx_path.is_file()


def write_index(idx_path: PathLike, lengths: np.ndarray, dtype: np.dtype) -> None:
    """Write a ``.idx`` for sequences of ``lengths`` stored back to back (one per document)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > np.iinfo(np.int32).max:
        raise SourceError("a Megatron .idx stores lengths as int32; a sequence is too long")
    pointers = (np.cumsum(lengths) - lengths) * np.dtype(dtype).itemsize
    n = len(lengths)
    with open(idx_path, "wb") as fh:
        fh.write(_HEADER.pack(MAGIC, VERSION, code_of(dtype), n, n + 1))
        fh.write(lengths.astype("<i4").tobytes())
        fh.write(pointers.astype("<i8").tobytes())
        fh.write(np.arange(n + 1, dtype="<i8").tobytes())


def read_index(idx_path: Path) -> Tuple[np.dtype, np.ndarray, np.ndarray]:
    """``(dtype, sizes int64, pointers int64)`` of a ``.idx``; SourceError naming the file."""
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as fh:
        head = fh.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise SourceError(
            f"{str(idx_path)!r} is {size} bytes, shorter than a Megatron .idx header "
            f"({_HEADER.size} bytes: magic {MAGIC!r}, version, dtype code, counts)")
    magic, version, code, seqs, docs = _HEADER.unpack(head)
    if magic != MAGIC:
        raise SourceError(
            f"{str(idx_path)!r} is not a Megatron .idx: it starts with {magic!r}, expected "
            f"the magic bytes {MAGIC!r}")
    if version != VERSION:
        raise SourceError(
            f"{str(idx_path)!r} has .idx version {version}; expected version {VERSION}")
    if code not in DTYPE_CODES:
        raise SourceError(
            f"{str(idx_path)!r} has dtype code {code}; expected one of {sorted(DTYPE_CODES)} "
            f"(Megatron-LM's DType enum)")
    need = _HEADER.size + 12 * seqs + 8 * docs
    if size < need:
        raise SourceError(
            f"{str(idx_path)!r} is {size} bytes but its header announces {seqs} sequences and "
            f"{docs} documents ({need} bytes); the file is truncated")
    mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
    sizes = np.frombuffer(mm, dtype="<i4", count=seqs, offset=_HEADER.size).astype(np.int64)
    pointers = np.frombuffer(mm, dtype="<i8", count=seqs,
                             offset=_HEADER.size + 4 * seqs).astype(np.int64)
    return np.dtype(DTYPE_CODES[code]), sizes, pointers


def open_binidx(path: PathLike) -> SpanColumn:
    """The ragged column "tokens" of the Megatron pair at ``path`` (prefix or either file)."""
    bin_path, idx_path = pair_paths(path)
    for p in (idx_path, bin_path):
        if not p.is_file():
            raise SourceNotFoundError(
                f"Megatron indexed dataset {str(path)!r}: {str(p)!r} does not exist; expected "
                f"a .bin + .idx pair (give the prefix or either file's path)")
    dtype, sizes, pointers = read_index(idx_path)
    itemsize = dtype.itemsize
    n_tokens = bin_path.stat().st_size // itemsize
    if len(sizes):
        if (sizes < 0).any() or (pointers % itemsize).any():
            raise SourceError(
                f"{str(idx_path)!r}: negative sizes or pointers not a multiple of the "
                f"{itemsize}-byte dtype {dtype}")
        ends = pointers // itemsize + sizes
        bad = np.flatnonzero((pointers < 0) | (ends > n_tokens))
        if len(bad):
            i = int(bad[0])
            raise SourceError(
                f"{str(idx_path)!r}: sequence {i} ends at token {int(ends[i])}, beyond the "
                f"{n_tokens} tokens of {str(bin_path)!r}; the .bin does not match its .idx")
    values = NpySource.from_files(
        {"tokens": FlatFile(str(bin_path), 0, dtype.newbyteorder("<"), (n_tokens,),
                            False, "megatron")})
    return SpanColumn(values, pointers // itemsize, sizes, kind="megatron")
