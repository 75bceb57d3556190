"""Attention patterns stored on disk, read one layer at a time.

Conventions (the same for :func:`induct_fast.scan` given a path and for ``induct-fast scan``):

``.npy``
    One array: ``[batch, layer, head, n, n]`` (a stacked cache), or ``[batch, head, n, n]`` (a
    single layer). Memory-mapped (``np.load(mmap_mode="r")``) and re-mapped for every layer, so
    only the pages one layer touches are ever resident.
``.npz``
    Either one stacked 5-d array, or one ``[batch, head, n, n]`` array per layer, layers in
    natural key order (``layer2`` before ``layer10``; TransformerLens names such as
    ``blocks.3.attn.hook_pattern`` sort the same way). Members saved uncompressed
    (``np.savez``) are memory-mapped inside the archive; compressed members (``np.savez_compressed``)
    are read one layer at a time (a compressed stacked array is read whole, once).
``.safetensors``
    The same two layouts, read through the ``safetensors`` package one layer (or one slice of a
    stacked tensor) at a time. bfloat16 tensors are not supported by its numpy API.

A key named ``tokens`` is never a layer: it holds the token ids ``[n]`` or ``[batch, n]`` the
patterns were computed on, and scans use it unless tokens are given explicitly. ``key`` (a glob,
e.g. ``"blocks.*.attn.hook_pattern"``) selects the layer arrays among the other keys.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

SUFFIXES = (".npy", ".npz", ".safetensors")
TOKENS_KEY = "tokens"

PathLike = Union[str, "os.PathLike[str]"]


class PatternFile:
    """The attention patterns of a file, as a sequence of layers ``[batch, head, n, n]``.

    Opening reads only headers: the layout, every layer's shape (checked to agree, so a mismatch
    is reported before any work) and the ``tokens`` entry if present. Iterating yields one layer
    at a time (memory-mapped where the format allows); drop each before taking the next.

    Attributes
    ----------
    path : Path
    keys : list of str
        The layer arrays' keys in layer order (one key for a stacked array; ``[""]`` for .npy).
    stacked : bool
        Whether layers are the second axis of a single 5-d array.
    layer_shape : tuple of int
        ``(batch, head, n, n)`` of every layer.
    tokens : ndarray of int or None
        The ``tokens`` entry of the file, if any.
    """

    def __init__(self, path: PathLike, key: Optional[str] = None):
        self.path = Path(path)
        self._reader = _reader_for(self.path)
        entries = self._reader.entries()
        self.tokens = self._read_tokens(entries)
        layers = _select(self.path, {k: s for k, s in entries.items() if k != TOKENS_KEY}, key)
        self.keys, self.stacked, self.layer_shape, self._n_layers = _layout(self.path, layers)

    def __len__(self) -> int:
        return self._n_layers

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.layers()

    def __repr__(self) -> str:
        layout = f"stacked {self.keys[0]!r}" if self.stacked else f"{len(self.keys)} keys"
        return f"PatternFile({str(self.path)!r}, layers={len(self)}, layer_shape={self.layer_shape}, {layout})"

    def layers(self) -> Iterator[np.ndarray]:
        """Each layer ``[batch, head, n, n]`` in order, read (or mapped) when it is reached."""
        for load in self.loaders():
            yield load()

    def loaders(self) -> Iterator[Callable[[], np.ndarray]]:
        """One function per layer that reads (or maps) it. Holding these instead of arrays lets a
        consumer release each layer before reading the next, whatever wraps the iteration."""
        if self.stacked:
            for layer in range(self._n_layers):
                yield functools.partial(self._reader.read, self.keys[0], layer)
        else:
            for key in self.keys:
                yield functools.partial(self._reader.read, key, None)

    def _read_tokens(self, entries: dict[str, tuple]) -> Optional[np.ndarray]:
        if TOKENS_KEY not in entries:
            return None
        return np.array(self._reader.read(TOKENS_KEY, None))


def open_patterns(path: PathLike, key: Optional[str] = None) -> PatternFile:
    """Opens a ``.npy``, ``.npz`` or ``.safetensors`` file of attention patterns (see the module
    docstring for the layouts); ``key`` is a glob selecting the layer arrays."""
    return PatternFile(path, key)


def load_tokens(path: PathLike) -> np.ndarray:
    """Token ids ``[n]`` or ``[batch, n]`` from ``.npy``, ``.npz`` / ``.safetensors`` (the key
    ``tokens``, or the only array), or text (``.txt``/``.csv``: one sequence per line)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".csv", ".tsv"):
        _check_exists(path)
        try:
            return np.loadtxt(path, dtype=np.int64, ndmin=1, delimiter="," if suffix == ".csv" else None)
        except ValueError as exc:
            raise ValueError(f"{path}: expected integer token ids, one sequence per line ({exc})") from None
    reader = _reader_for(path)
    entries = reader.entries()
    if TOKENS_KEY in entries:
        key = TOKENS_KEY
    elif len(entries) == 1:
        key = next(iter(entries))
    else:
        raise ValueError(f"{path}: expected a key {TOKENS_KEY!r} or a single array, got keys {', '.join(entries)}")
    return np.array(reader.read(key, None))


# -- layout ------------------------------------------------------------------------------------


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``layer2`` < ``layer10``."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def _select(path: Path, entries: dict[str, tuple], key: Optional[str]) -> dict[str, tuple]:
    if key is None:
        return entries
    chosen = {k: s for k, s in entries.items() if fnmatch.fnmatchcase(k, key)}
    if not chosen:
        raise ValueError(f"key: no array in {path} matches {key!r}; its keys: {', '.join(entries) or '(none)'}")
    return chosen


def _layout(path: Path, entries: dict[str, tuple]) -> tuple[list[str], bool, tuple, int]:
    """(layer keys in order, stacked?, layer shape, number of layers) after checking shapes."""
    if not entries:
        raise ValueError(f"{path}: expected arrays of attention patterns, found none")
    if len(entries) == 1:
        (key, shape), = entries.items()
        if len(shape) == 5:
            return [key], True, (shape[0],) + tuple(shape[2:]), shape[1]
    keys = sorted(entries, key=natural_key)
    first = keys[0]
    for key in keys:
        shape = entries[key]
        if len(shape) != 4:
            raise ValueError(
                f"{path}: expected one stacked array [batch, layer, head, n, n] or one [batch, head, n, n] "
                f"array per layer, got {_label(key)} of shape {tuple(shape)}"
            )
        if tuple(shape) != tuple(entries[first]):
            raise ValueError(
                f"{path}: every layer must have the same shape; {_label(first)} is {tuple(entries[first])}, "
                f"{_label(key)} is {tuple(shape)}"
            )
    return keys, False, tuple(entries[first]), len(keys)


def _label(key: str) -> str:
    return f"key {key!r}" if key else "the array"


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def _reader_for(path: Path) -> Any:
    _check_exists(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _NpyReader(path)
    if suffix == ".npz":
        return _NpzReader(path)
    if suffix == ".safetensors":
        return _SafetensorsReader(path)
    raise ValueError(f"{path}: expected a file ending in {', '.join(SUFFIXES)}, got {suffix or 'no suffix'!r}")


# -- readers: entries() -> {key: shape}; read(key, layer) -> array (layer: index along axis 1) --


class _NpyReader:
    def __init__(self, path: Path):
        self.path = path

    def _map(self) -> np.ndarray:
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{self.path}: not a readable .npy file ({exc})") from None

    def entries(self) -> dict[str, tuple]:
        return {"": self._map().shape}

    def read(self, key: str, layer: Optional[int]) -> np.ndarray:
        # A fresh mapping per call: once the caller drops the array, its pages leave the
        # process (a mapping kept open would keep every page ever touched resident).
        array = self._map()
        return array if layer is None else array[:, layer]


class _NpzReader:
    def __init__(self, path: Path):
        self.path = path
        self._headers: dict[str, tuple] = {}  # key -> (member name, shape, fortran, dtype, offset or None)
        self._whole: dict[str, np.ndarray] = {}
        try:
            with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
                for info in archive.infolist():
                    if info.filename.endswith(".npy"):
                        self._headers[info.filename[: -len(".npy")]] = _npz_member_header(archive, raw, info)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as exc:
            raise ValueError(f"{path}: not a readable .npz file ({exc})") from None

    def entries(self) -> dict[str, tuple]:
        return {key: header[1] for key, header in self._headers.items()}

    def read(self, key: str, layer: Optional[int]) -> np.ndarray:
        name, shape, fortran, dtype, offset = self._headers[key]
        if offset is not None:
            array = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        elif layer is not None:
            # Compressed and stacked: decompress once, keep it for the following layers.
            if key not in self._whole:
                self._whole[key] = self._load_member(name)
            array = self._whole[key]
        else:
            array = self._load_member(name)
        return array if layer is None else array[:, layer]

    def _load_member(self, name: str) -> np.ndarray:
        with zipfile.ZipFile(self.path) as archive, archive.open(name) as member:
            return np.lib.format.read_array(member, allow_pickle=False)


def _npz_member_header(archive: zipfile.ZipFile, raw: Any, info: zipfile.ZipInfo) -> tuple:
    """(name, shape, fortran, dtype, data offset in the archive or None) of one .npy member.

    The offset is known for stored (uncompressed) members only, which can then be mapped:
    the data starts after the local file header (30 bytes + name + extra field) and the .npy
    header.
    """
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(member)
        npy_header_len = member.tell()
    if dtype.hasobject:
        raise ValueError(f"member {info.filename!r} holds Python objects, not numbers")
    offset = None
    if info.compress_type == zipfile.ZIP_STORED and int(np.prod(shape)) > 0:
        raw.seek(info.header_offset)
        local = raw.read(30)
        signature, name_len, extra_len = struct.unpack("<I22xHH", local)
        if signature == 0x04034B50:
            offset = info.header_offset + 30 + name_len + extra_len + npy_header_len
    return info.filename, tuple(shape), fortran, dtype, offset


class _SafetensorsReader:
    def __init__(self, path: Path):
        self.path = path
        try:
            from safetensors import safe_open
        except ImportError:
            raise ImportError(
                f"{path}: reading .safetensors files needs the safetensors package: pip install safetensors"
            ) from None
        self._open = lambda: safe_open(str(path), framework="numpy")
        try:
            with self._open() as f:
                slices = {key: f.get_slice(key) for key in f.keys()}
                self._shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
                self._dtypes = {key: str(s.get_dtype()) for key, s in slices.items()}
        except Exception as exc:  # SafetensorError is not importable under a stable name
            raise ValueError(f"{path}: not a readable .safetensors file ({exc})") from None

    def entries(self) -> dict[str, tuple]:
        return dict(self._shapes)

    def read(self, key: str, layer: Optional[int]) -> np.ndarray:
        if self._dtypes[key].upper() == "BF16":
            raise TypeError(f"{self.path}: {key!r} is bfloat16, which numpy cannot hold; save it as float32 or float16")
        try:
            with self._open() as f:
                return f.get_tensor(key) if layer is None else f.get_slice(key)[:, layer]
        except Exception as exc:
            raise ValueError(f"{self.path}: could not read {key!r} ({exc})") from None
