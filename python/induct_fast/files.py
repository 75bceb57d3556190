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
    stacked tensor) at a time. bfloat16 tensors, which its numpy API refuses, are memory-mapped
    from the file instead, as arrays of 2-byte elements of dtype ``[("bfloat16", "V2")]`` (the
    package's bfloat16 view, which every induct_fast function reads natively; numpy arithmetic
    refuses it, ``.view(ml_dtypes.bfloat16)`` gives the numbers).

A key named ``tokens`` is never a layer: it holds the token ids ``[n]`` or ``[batch, n]`` the
patterns were computed on, and scans use it unless tokens are given explicitly. ``key`` (a glob,
e.g. ``"blocks.*.attn.hook_pattern"``) selects the layer arrays among the other keys.

A saved TransformerLens cache (``np.savez(path, **cache)`` or a safetensors file with hook names
as keys) is read without ``key``: its ``blocks.{l}.attn.hook_pattern`` arrays if it has them,
else its queries and keys (``blocks.{l}.attn.hook_rot_q`` / ``hook_rot_k``, else ``hook_q`` /
``hook_k``, ``[batch, n, heads, d_head]`` per layer), which are then scored from q and k like
:func:`induct_fast.scores_from_qk` (with its default rules: a saved file has no model).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from ._arrays import BFLOAT16_BITS

SUFFIXES = (".npy", ".npz", ".safetensors")
TOKENS_KEY = "tokens"
# TransformerLens hook names, as a saved ActivationCache has them.
_TL_PATTERN = re.compile(r"^blocks\.(\d+)\.attn\.hook_pattern$")
_TL_QK = (("blocks.{}.attn.hook_rot_q", "blocks.{}.attn.hook_rot_k"), ("blocks.{}.attn.hook_q", "blocks.{}.attn.hook_k"))
_SHOWN_KEYS = 8  # keys listed in an error message before "... and N more"

PathLike = Union[str, "os.PathLike[str]"]
Shape = tuple[int, ...]


class PatternFile:
    """The attention patterns of a file, as a sequence of layers ``[batch, head, n, n]``.

    Opening reads only headers: the layout, every layer's shape (checked to agree, so a mismatch
    is reported before any work) and the ``tokens`` entry if present. Iterating yields one layer
    at a time (memory-mapped where the format allows); drop each before taking the next.

    Attributes
    ----------
    path : Path
    kind : {"patterns", "qk"}
        Layers are attention patterns, or ``(q, k)`` pairs (a saved TransformerLens cache
        without patterns).
    keys : list of str
        The layer arrays' keys in layer order (one key for a stacked array; ``[""]`` for .npy;
        the query keys for ``qk``).
    k_keys : list of str
        The key (``hook_k``) arrays of each layer for ``qk``; empty otherwise.
    stacked : bool
        Whether layers are the second axis of a single 5-d array.
    layer_shape : tuple of int
        ``(batch, head, n, n)`` of every layer (for ``qk``: the queries' ``(batch, n, heads, d_head)``).
    tokens : ndarray of int or None
        The ``tokens`` entry of the file, if any.
    """

    def __init__(self, path: PathLike, key: Optional[str] = None):
        self.path = Path(path)
        self._reader = _reader_for(self.path)
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key: expected a glob (str) naming the layer arrays, got {key!r}")
        if key is not None and isinstance(self._reader, _NpyReader):
            raise ValueError(f"key: {self.path} is a .npy file, which holds one array and no keys; drop the key (--key)")
        entries = self._reader.entries()
        self.tokens = self._read_tokens(entries)
        arrays = {k: s for k, s in entries.items() if k != TOKENS_KEY}
        self.kind = "patterns"
        self.k_keys: list[str] = []
        qk = _tl_qk_keys(arrays) if key is None and not any(map(_TL_PATTERN.match, arrays)) else None
        if qk is not None:
            self.kind = "qk"
            self.keys, self.k_keys, self.layer_shape = _qk_layout(self.path, arrays, *qk)
            self.stacked, self._n_layers = False, len(self.keys)
            return
        if key is None and any(map(_TL_PATTERN.match, arrays)):
            key = "blocks.*.attn.hook_pattern"  # a saved cache: its patterns, not its other hooks
            arrays = {k: s for k, s in arrays.items() if _TL_PATTERN.match(k)}
        layers = _select(self.path, arrays, key)
        self.keys, self.stacked, self.layer_shape, self._n_layers = _layout(self.path, layers, key)

    def __len__(self) -> int:
        return self._n_layers

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.layers()

    def __repr__(self) -> str:
        layout = f"stacked {self.keys[0]!r}" if self.stacked else f"{len(self.keys)} keys"
        if self.kind == "qk":
            layout += ", q and k"
        return f"PatternFile({str(self.path)!r}, layers={len(self)}, layer_shape={self.layer_shape}, {layout})"

    def layers(self) -> Iterator[Any]:
        """Each layer ``[batch, head, n, n]`` (``qk``: a ``(q, k)`` pair) in order, read (or
        mapped) when it is reached."""
        for load in self.loaders():
            yield load()

    def loaders(self) -> Iterator[Callable[[], Any]]:
        """One function per layer that reads (or maps) it. Holding these instead of arrays lets a
        consumer release each layer before reading the next, whatever wraps the iteration."""
        if self.kind == "qk":
            for q_key, k_key in zip(self.keys, self.k_keys):
                yield functools.partial(self._read_pair, q_key, k_key)
        elif self.stacked:
            for layer in range(self._n_layers):
                yield functools.partial(self._reader.read, self.keys[0], layer)
        else:
            for key in self.keys:
                yield functools.partial(self._reader.read, key, None)

    def _read_pair(self, q_key: str, k_key: str) -> tuple[np.ndarray, np.ndarray]:
        return self._reader.read(q_key, None), self._reader.read(k_key, None)

    def _read_tokens(self, entries: dict[str, Shape]) -> Optional[np.ndarray]:
        if TOKENS_KEY not in entries:
            return None
        return np.array(self._reader.read(TOKENS_KEY, None))


def open_patterns(path: PathLike, key: Optional[str] = None) -> PatternFile:
    """Opens a ``.npy``, ``.npz`` or ``.safetensors`` file of attention patterns (see the module
    docstring for the layouts); ``key`` is a glob selecting the layer arrays."""
    return PatternFile(path, key)


def load_tokens(path: PathLike, key: Optional[str] = None, name: str = "tokens") -> np.ndarray:
    """Token ids ``[n]`` or ``[batch, n]`` from ``.npy``, ``.npz`` / ``.safetensors`` (the array
    named ``key``; without it the key ``tokens``, or the only array), or text
    (``.txt``/``.csv``: one sequence per line). ``name`` is what errors call the array (the CLI
    also loads the 0/1 spans ``queries`` / ``keys`` this way)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".csv", ".tsv"):
        _check_exists(path)
        if key is not None:
            raise ValueError(f"{name}: {path} is a text file, which has no keys; drop ':{key}'")
        try:
            return np.loadtxt(path, dtype=np.int64, ndmin=1, delimiter="," if suffix == ".csv" else None)
        except ValueError as exc:
            raise ValueError(f"{path}: expected integers, one sequence per line ({exc})") from None
    reader = _reader_for(path)
    entries = reader.entries()
    if key is not None:
        if isinstance(reader, _NpyReader):
            raise ValueError(f"{name}: {path} is a .npy file, which holds one array and no keys; drop ':{key}'")
        if key not in entries:
            raise ValueError(f"{name}: {path} has no array {key!r}; {_some_keys(entries)}")
    elif TOKENS_KEY in entries:
        key = TOKENS_KEY
    elif len(entries) == 1:
        key = next(iter(entries))
    else:
        raise ValueError(
            f"{name}: {path} holds {len(entries)} arrays and none is named {TOKENS_KEY!r}; name one as "
            f"FILE:KEY (--{name} {path}:KEY); {_some_keys(entries, _looks_like_tokens)}"
        )
    return np.array(reader.read(key, None))


def split_key(spec: str) -> tuple[str, Optional[str]]:
    """``"FILE:KEY"`` -> ``("FILE", "KEY")``; a name that exists as a file, or has no ``:``
    after its suffix, is a file alone."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, key = spec.rsplit(":", 1)
    if not path or not key:
        return spec, None
    return path, key


# -- layout ------------------------------------------------------------------------------------


def natural_key(name: str) -> tuple[Union[str, int], ...]:
    """Sort key that orders embedded numbers by value: ``layer2`` < ``layer10``."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def _select(path: Path, entries: dict[str, Shape], key: Optional[str]) -> dict[str, Shape]:
    if key is None:
        return entries
    chosen = {k: s for k, s in entries.items() if fnmatch.fnmatchcase(k, key)}
    if not chosen:
        raise ValueError(f"key: no array in {path} matches {key!r}; {_some_keys(entries, _looks_like_patterns)}")
    return chosen


def _layout(path: Path, entries: dict[str, Shape], key: Optional[str] = None) -> tuple[list[str], bool, Shape, int]:
    """(layer keys in order, stacked?, layer shape, number of layers) after checking shapes."""
    if not entries:
        raise ValueError(f"{path}: expected arrays of attention patterns, found none")
    if len(entries) == 1:
        (only, shape), = entries.items()
        if len(shape) == 5:
            return [only], True, (shape[0],) + tuple(shape[2:]), shape[1]
    # Several arrays that cannot all be layers, and nothing chose among them: say how to choose.
    hint = "" if key is not None or len(entries) == 1 else (
        f"; select the layer arrays with --key GLOB (key= in Python): {_some_keys(entries, _looks_like_patterns)}"
    )
    keys = sorted(entries, key=natural_key)
    first = keys[0]
    for name in keys:
        shape = entries[name]
        if len(shape) != 4:
            raise ValueError(
                f"{path}: expected one stacked array [batch, layer, head, n, n] or one [batch, head, n, n] "
                f"array per layer, got {_label(name)} of shape {tuple(shape)}{hint}"
            )
        if tuple(shape) != tuple(entries[first]):
            raise ValueError(
                f"{path}: every layer must have the same shape; {_label(first)} is {tuple(entries[first])}, "
                f"{_label(name)} is {tuple(shape)}{hint}"
            )
    return keys, False, tuple(entries[first]), len(keys)


def _tl_qk_keys(entries: dict[str, Shape]) -> Optional[tuple[str, str, int]]:
    """(q key, k key templates, layers) of a saved TransformerLens cache without patterns."""
    for q_key, k_key in _TL_QK:
        n = 0
        while q_key.format(n) in entries and k_key.format(n) in entries:
            n += 1
        if n:
            return q_key, k_key, n
    return None


def _qk_layout(path: Path, entries: dict[str, Shape], q_key: str, k_key: str, n: int) -> tuple[list[str], list[str], Shape]:
    qs = [q_key.format(layer) for layer in range(n)]
    ks = [k_key.format(layer) for layer in range(n)]
    for names in (qs, ks):
        for name in names:
            shape = tuple(entries[name])
            if len(shape) != 4 or shape != tuple(entries[names[0]]):
                raise ValueError(
                    f"{path}: expected every {names[0].split('.')[-1]!r} array of shape (batch, n, heads, d_head) like "
                    f"{names[0]!r} {tuple(entries[names[0]])}, got {name!r} of shape {shape}"
                )
    return qs, ks, tuple(entries[qs[0]])


def _looks_like_patterns(name: str, shape: Shape) -> bool:
    return len(shape) in (4, 5) and shape[-1] == shape[-2]


def _looks_like_tokens(name: str, shape: Shape) -> bool:
    return len(shape) in (1, 2) and "token" in name.lower()


def _some_keys(entries: dict[str, Shape], likely: Optional[Callable[[str, Shape], bool]] = None) -> str:
    """A short list of keys for an error message: those that fit (``likely``) first, with shapes,
    at most a few, then how many more there are."""
    if not entries:
        return "it holds no arrays"
    names = sorted(entries, key=natural_key)
    if likely is not None and any(likely(k, tuple(entries[k])) for k in names):
        names = [k for k in names if likely(k, tuple(entries[k]))]
        what = "arrays of a fitting shape"
    else:
        what = "its arrays"
    shown = ", ".join(f"{k!r} {tuple(entries[k])}" for k in names[:_SHOWN_KEYS])
    more = f" and {len(names) - _SHOWN_KEYS} more" if len(names) > _SHOWN_KEYS else ""
    total = f" (of {len(entries)})" if len(names) < len(entries) else ""
    return f"{what}{total}: {shown}{more}"


def _label(key: str) -> str:
    return f"key {key!r}" if key else "the array"


def _check_exists(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a file")
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
            mapped: np.ndarray = np.load(self.path, mmap_mode="r", allow_pickle=False)
            return mapped
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{self.path}: not a readable .npy file ({exc})") from None

    def entries(self) -> dict[str, Shape]:
        shape = self._check_header()
        return {"": shape}

    def _check_header(self) -> Shape:
        """The array's shape from the header, after checking the file holds all its data (a
        truncated file would otherwise fail deep inside mmap)."""
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                data_start = f.tell()
        except (ValueError, OSError, EOFError, struct.error) as exc:
            raise ValueError(f"{self.path}: not a readable .npy file ({exc})") from None
        if dtype.hasobject:
            raise ValueError(f"{self.path}: not a readable .npy file (it holds Python objects, not numbers)")
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        have = self.path.stat().st_size - data_start
        if have < need:
            raise ValueError(
                f"{self.path}: truncated: its header describes {dtype} data of shape {tuple(shape)} ({need} bytes), "
                f"the file holds {have} bytes of it"
            )
        return tuple(shape)

    def read(self, key: str, layer: Optional[int]) -> np.ndarray:
        # A fresh mapping per call: once the caller drops the array, its pages leave the
        # process (a mapping kept open would keep every page ever touched resident).
        array = self._map()
        return array if layer is None else array[:, layer]


class _NpzReader:
    """Members of an .npz archive; stored (uncompressed) ones are memory-mapped in place."""

    def __init__(self, path: Path):
        self.path = path
        self._headers: dict[str, _Member] = {}
        self._whole: dict[str, np.ndarray] = {}
        try:
            with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
                for info in archive.infolist():
                    if info.filename.endswith(".npy"):
                        self._headers[info.filename[: -len(".npy")]] = _npz_member_header(archive, raw, info)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as exc:
            raise ValueError(f"{path}: not a readable .npz file ({exc})") from None

    def entries(self) -> dict[str, Shape]:
        return {key: header[1] for key, header in self._headers.items()}

    def read(self, key: str, layer: Optional[int]) -> np.ndarray:
        name, shape, fortran, dtype, offset = self._headers[key]
        array: np.ndarray
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
            array: np.ndarray = np.lib.format.read_array(member, allow_pickle=False)
        return array


# One .npy member of an .npz: (member name, shape, fortran order, dtype, data offset or None).
_Member = tuple[str, Shape, bool, np.dtype[Any], Optional[int]]


def _npz_member_header(archive: zipfile.ZipFile, raw: Any, info: zipfile.ZipInfo) -> _Member:
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
        self._open: Callable[[], Any] = lambda: safe_open(str(path), framework="numpy")
        try:
            with self._open() as f:
                slices = {key: f.get_slice(key) for key in f.keys()}
                self._shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
                self._dtypes = {key: str(s.get_dtype()) for key, s in slices.items()}
        except Exception as exc:  # SafetensorError is not importable under a stable name
            raise ValueError(f"{path}: not a readable .safetensors file ({exc})") from None

    def entries(self) -> dict[str, Shape]:
        return dict(self._shapes)

    def read(self, key: str, layer: Optional[int]) -> np.ndarray:
        if self._dtypes[key].upper() == "BF16":
            return self._bfloat16(key, layer)
        try:
            with self._open() as f:
                array: np.ndarray = f.get_tensor(key) if layer is None else f.get_slice(key)[:, layer]
            return array
        except Exception as exc:
            raise ValueError(f"{self.path}: could not read {key!r} ({exc})") from None

    def _bfloat16(self, key: str, layer: Optional[int]) -> np.ndarray:
        """A bfloat16 tensor memory-mapped as :data:`~induct_fast._arrays.BFLOAT16_BITS` (numpy has
        no bfloat16, so the safetensors numpy API refuses it). The format: an 8-byte little-endian
        header size, the JSON header (each tensor's ``data_offsets`` into the data), the data."""
        shape = self._shapes[key]
        try:
            with open(self.path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                start, end = json.loads(f.read(size))[key]["data_offsets"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path}: could not read {key!r} ({exc})") from None
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != 2 * count:
            raise ValueError(f"{self.path}: {key!r} holds {end - start} bytes, expected {2 * count} for bfloat16 of shape {shape}")
        if count == 0:
            array = np.empty(shape, BFLOAT16_BITS)
        else:
            array = np.memmap(self.path, dtype=BFLOAT16_BITS, mode="r", offset=8 + size + start, shape=shape)
        return array if layer is None else array[:, layer]
