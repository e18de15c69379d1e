"""Write ragged datasets: text -> byte-level Megatron ``.bin``/``.idx``, and between formats.

Text: a folder of text files (one document per file, files matching ``glob`` in sorted path
order) or a JSON-lines file (one document per line, the text under ``text_key``) becomes a
byte-level token dataset: each document's UTF-8 bytes are its tokens (uint8), written to a
Megatron pair.  Ragged formats: any dataset ``gpuloader.open_dataset`` reads with ragged fields
(Megatron, ``NAME.values.npy`` + ``NAME.offsets.npy`` folders, HDF5 ``values``/``offsets``
groups or vlen datasets) is written as a Megatron pair (one ragged field, no fixed ones), a
folder, or an HDF5 file (``.h5``) -- fixed fields alongside.

Everything streams: documents are appended as they are read, samples are copied in blocks of
about ``block_bytes``; outputs are written under temporary names and renamed into place last,
so an existing destination is complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from gpuloader.checks import int_at_least
from gpuloader.errors import ArgumentError, SourceError, SourceNotFoundError
from gpuloader.sources.binidx import pair_paths, write_index

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_BLOCK_BYTES = 64 << 20
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def output_kind(dst: PathLike) -> str:
    """"megatron" (``.bin``/``.idx``), "hdf5" (``.h5``...) or "folder", from the name."""
    suffix = Path(dst).suffix.lower()
    if suffix in (".bin", ".idx"):
        return "megatron"
    return "hdf5" if suffix in _HDF5_SUFFIXES else "folder"


def _check_target(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ArgumentError(f"convert: destination {str(existing[0])!r} exists; pass "
                            f"overwrite=True (--overwrite) to replace it")


def _documents(src: Path, text_key: Optional[str], glob: str) -> Iterator[bytes]:
    """Each document's UTF-8 bytes (see the module docstring)."""
    if src.is_dir():
        files = sorted(p for p in src.glob(glob) if p.is_file())
        if not files:
            raise SourceError(f"convert: folder {str(src)!r} has no files matching {glob!r}")
        for file in files:
            yield file.read_bytes()
        return
    key = text_key or "text"
    with open(src, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise SourceError(f"convert: {str(src)!r} line {number} is not JSON ({exc}); "
                                  f"expected one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise SourceError(
                    f"convert: {str(src)!r} line {number} has no string under --text-key "
                    f"{key!r}; keys there: {sorted(record) if isinstance(record, dict) else '-'}")
            yield record[key].encode("utf-8")


def split_documents(documents: Iterable[bytes], max_length: Optional[int]) -> Iterator[bytes]:
    """Each document, or with ``max_length`` its consecutive pieces of at most that many bytes
    (the last may be shorter; nothing is dropped; empty documents stay one empty sample)."""
    for doc in documents:
        if max_length is None or len(doc) <= max_length:
            yield doc
            continue
        for start in range(0, len(doc), max_length):
            yield doc[start:start + max_length]


def text_to_tokens(src: PathLike, dst: PathLike, *, text_key: Optional[str] = None,
                   glob: str = "**/*", overwrite: bool = False,
                   max_length: Optional[int] = None) -> Dict[str, Any]:
    """Byte-level Megatron pair at ``dst`` (prefix or either file) from text at ``src``; with
    ``max_length`` long documents become consecutive samples of at most that many tokens.

    Returns ``{"dst", "documents", "tokens", "format": "megatron"}`` (documents: samples
    written).
    """
    if max_length is not None:
        max_length = int_at_least("max_length", max_length, 1, "a positive int or None")
    source = Path(src)
    if not source.exists():
        raise SourceNotFoundError(f"convert: source {str(source)!r} does not exist; expected a "
                                  f"folder of text files or a JSON-lines file")
    return write_tokens(split_documents(_documents(source, text_key, glob), max_length), dst,
                        overwrite=overwrite)


def write_tokens(documents: Iterable[bytes], dst: PathLike, *,
                 overwrite: bool = False) -> Dict[str, Any]:
    """Each of ``documents`` (bytes) as one sample of byte-level (uint8) tokens in a Megatron
    pair at ``dst`` (prefix or either file), streamed; renamed into place when complete."""
    bin_path, idx_path = pair_paths(dst)
    _check_target([bin_path, idx_path], overwrite)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = Path(f"{bin_path}.tmp"), Path(f"{idx_path}.tmp")
    lengths: List[int] = []
    try:
        with open(tmp_bin, "wb") as out:
            for doc in documents:
                out.write(doc)
                lengths.append(len(doc))
        write_index(tmp_idx, np.asarray(lengths, dtype=np.int64), np.dtype(np.uint8))
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    return {"dst": str(bin_path.with_suffix("")), "format": "megatron",
            "documents": len(lengths), "tokens": int(sum(lengths))}


def _blocks(lengths: np.ndarray, per_token: int, fixed_bytes: int,
            block_bytes: int) -> Iterator[Tuple[int, int]]:
    """Sample ranges of about ``block_bytes`` (at least one sample each)."""
    cost = lengths * per_token + fixed_bytes
    cum = np.cumsum(cost)
    start = 0
    while start < len(lengths):
        base = int(cum[start - 1]) if start else 0
        stop = int(np.searchsorted(cum, base + block_bytes, side="right"))
        stop = max(stop, start + 1)
        yield start, min(stop, len(lengths))
        start = stop


def convert_ragged(src: PathLike, dst: PathLike, *, fields: Optional[Sequence[str]] = None,
                   compression: Optional[str] = None, overwrite: bool = False,
                   block_bytes: int = DEFAULT_BLOCK_BYTES) -> Dict[str, Any]:
    """Copy the dataset at ``src`` (with ragged fields) to ``dst`` in the format its name says.

    Returns ``{"dst", "format", "rows", "fields": {name: {"dtype", "shape", "ragged"}},
    "tokens": {ragged name: total}}``.
    """
    from gpuloader.dataset import open_dataset

    ds = open_dataset(src, fields=fields)
    kind = output_kind(dst)
    if not ds.ragged_fields:
        raise ArgumentError(f"convert: {str(src)!r} has no ragged field; ragged outputs need "
                            f"one (use a .npy folder or .h5 destination for fixed fields)")
    if kind == "megatron" and list(ds.fields) != ds.ragged_fields[:1]:
        raise ArgumentError(
            f"convert: a Megatron .bin/.idx holds exactly one ragged field and no fixed ones; "
            f"{str(src)!r} has fields {list(ds.fields)} -- pick one with --fields")
    if compression is not None and kind != "hdf5":
        raise ArgumentError("convert: compression applies to HDF5 output only (name it .h5)")
    writer = _WRITERS[kind](Path(os.fspath(dst)), ds, overwrite, compression)
    try:
        lengths = {n: ds.lengths(n) for n in ds.ragged_fields}
        per_token = sum(ds.fields[n].sample_nbytes for n in lengths)
        fixed = sum(s.sample_nbytes for n, s in ds.fields.items() if not s.ragged)
        longest = np.max(np.stack(list(lengths.values())), axis=0) if len(ds) else np.zeros(0)
        for a, b in _blocks(longest, per_token, fixed, block_bytes):
            writer.append(ds.read_batch(np.arange(a, b)), {n: v[a:b] for n, v in lengths.items()})
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        ds.close()
    return {"dst": str(dst), "format": kind, "rows": len(ds),
            "fields": {n: {"dtype": str(s.dtype), "shape": list(s.shape), "ragged": s.ragged}
                       for n, s in ds.fields.items()},
            "tokens": {n: int(v.sum()) for n, v in lengths.items()}}


class _Writer:
    """Streams batches of one dataset into temporary files, renamed into place by finish."""

    def __init__(self, dst: Path, ds: Any, overwrite: bool, compression: Optional[str]) -> None:
        self.dst, self.ds, self.compression = dst, ds, compression
        self.targets = self._targets()
        _check_target(self.targets, overwrite)
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = [Path(f"{t}.tmp") for t in self.targets]
        self.open()

    def _targets(self) -> List[Path]:
        return [self.dst]

    def open(self) -> None: ...

    def append(self, batch: Dict[str, Any], lengths: Dict[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...

    def finish(self) -> None:
        self.close()
        for tmp, target in zip(self.tmp, self.targets):
            if target.is_dir():
                import shutil
                shutil.rmtree(target)
            os.replace(tmp, target)

    def abort(self) -> None:
        self.close()
        import shutil
        for tmp in self.tmp:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


class _MegatronWriter(_Writer):
    def _targets(self) -> List[Path]:
        return list(pair_paths(self.dst))

    def open(self) -> None:
        self.name = self.ds.ragged_fields[0]
        self.fh = open(self.tmp[0], "wb")

    def append(self, batch: Dict[str, Any], lengths: Dict[str, np.ndarray]) -> None:
        self.fh.write(batch[self.name].numpy().tobytes())

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()
            write_index(self.tmp[1], self.ds.lengths(self.name), self.ds.fields[self.name].dtype)


class _FolderWriter(_Writer):
    """``NAME.values.npy`` + ``NAME.offsets.npy`` per ragged field, ``NAME.npy`` per fixed."""

    def open(self) -> None:
        root = self.tmp[0]
        root.mkdir()
        self.files = {}
        for name, spec in self.ds.fields.items():
            rows = int(self.ds.lengths(name).sum()) if spec.ragged else len(self.ds)
            file = root / (f"{name}.values.npy" if spec.ragged else f"{name}.npy")
            fh = open(file, "wb")
            np.lib.format.write_array_header_2_0(fh, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(spec.dtype)),
                "fortran_order": False, "shape": (rows, *spec.shape)})
            self.files[name] = fh
            if spec.ragged:
                lens = self.ds.lengths(name)
                np.save(root / f"{name}.offsets.npy",
                        np.concatenate(([0], np.cumsum(lens))).astype(np.int64))

    def append(self, batch: Dict[str, Any], lengths: Dict[str, np.ndarray]) -> None:
        for name, fh in self.files.items():
            fh.write(np.ascontiguousarray(batch[name].numpy()).tobytes())

    def close(self) -> None:
        for fh in getattr(self, "files", {}).values():
            fh.close()


class _Hdf5Writer(_Writer):
    """A group NAME with ``values``/``offsets`` per ragged field, a dataset per fixed one."""

    def open(self) -> None:
        import h5py

        self.h5 = h5py.File(self.tmp[0], "w")
        self.pos: Dict[str, int] = {}
        options = {"compression": self.compression} if self.compression else {}
        for name, spec in self.ds.fields.items():
            rows = int(self.ds.lengths(name).sum()) if spec.ragged else len(self.ds)
            chunk = max(1, min(max(1, rows), (1 << 20) // max(1, spec.sample_nbytes)))
            key = f"{name}/values" if spec.ragged else name
            self.h5.create_dataset(key, shape=(rows, *spec.shape), dtype=spec.dtype,
                                   chunks=(chunk, *spec.shape) if rows else None, **options)
            if spec.ragged:
                lens = self.ds.lengths(name)
                self.h5[f"{name}/offsets"] = np.concatenate(([0], np.cumsum(lens))).astype(
                    np.int64)
            self.pos[key] = 0

    def append(self, batch: Dict[str, Any], lengths: Dict[str, np.ndarray]) -> None:
        for name, spec in self.ds.fields.items():
            key = f"{name}/values" if spec.ragged else name
            block = batch[name].numpy()
            a = self.pos[key]
            self.h5[key][a:a + len(block)] = block
            self.pos[key] = a + len(block)

    def close(self) -> None:
        if getattr(self, "h5", None) is not None and self.h5.id.valid:
            self.h5.close()


_WRITERS = {"megatron": _MegatronWriter, "folder": _FolderWriter, "hdf5": _Hdf5Writer}
