"""Packing datasets from Python: :class:`Writer` and :func:`pack_numpy`."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from shardlock._lib import FormatError, NativeWriter
from shardlock._lib import assemble as _assemble
from shardlock.loader import _size_arg, _storage_options

PathLike = Union[str, "os.PathLike[str]"]

#: NumPy dtype -> shardlock dtype name.
_NP_TO_DTYPE = {
    np.dtype("uint8"): "u8",
    np.dtype("int8"): "i8",
    np.dtype("int16"): "i16",
    np.dtype("uint16"): "u16",
    np.dtype("int32"): "i32",
    np.dtype("uint32"): "u32",
    np.dtype("int64"): "i64",
    np.dtype("uint64"): "u64",
    np.dtype("float16"): "f16",
    np.dtype("float32"): "f32",
    np.dtype("float64"): "f64",
    np.dtype("bool"): "bool",
}

#: shardlock dtype name -> little-endian NumPy dtype (bf16 is stored as its 16 bits).
_DTYPE_TO_NP = {v: k.newbyteorder("<") for k, v in _NP_TO_DTYPE.items()}
_DTYPE_TO_NP["bf16"] = np.dtype("<u2")


def _as_field(name: str, value: Any, arr: Any, forced: Optional[str], dt: str, shape: Tuple[int, ...]) -> Any:
    """``arr`` as the little-endian dtype and the shape the schema gives field ``name``:
    a lossless cast (another byte order, a narrower integer, a Python number that
    fits), else :class:`FormatError` naming the field, the dtype given and the one
    expected. Never a reinterpretation of the bytes."""
    target = _DTYPE_TO_NP[dt]
    if (forced == "bf16") != (dt == "bf16"):
        raise FormatError(f"field {name!r} is {dt}; got {forced or arr.dtype}")
    given = arr.dtype
    if dt != "bf16" and not np.can_cast(given, target, casting="safe"):
        ok = False
        if not isinstance(value, (np.ndarray, np.generic)) and not type(value).__module__.startswith("torch"):
            # Python numbers (or lists of them), which carry no dtype of their own: any
            # into a float field; into an integer field only if they fit exactly.
            if target.kind == "f":
                ok = True
            else:
                with np.errstate(all="ignore"):
                    cast = np.asarray(value).astype(target)
                ok = bool(np.all(cast.astype(given) == np.asarray(value)))
        if not ok:
            raise FormatError(
                f"field {name!r} expects {dt} ({target.str}); got {given} ({given.str}), which does not convert "
                f"without loss: convert it first (e.g. .astype(np.{target.name}))"
            )
    if tuple(arr.shape) != tuple(shape):
        raise FormatError(f"field {name!r} expects shape {list(shape)}; got {list(arr.shape)}")
    return np.asarray(arr, order="C").astype(target, copy=False)


class _Progress:
    """A one-line progress report on stderr (samples, bytes, rate; the percentage when
    the total is known), redrawn at most 5 times a second and cleared at the end. On
    only when asked, or by default when stderr is a terminal."""

    def __init__(self, enabled: Optional[bool], what: str, total: Optional[int] = None) -> None:
        self.on = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.what, self.total = what, total
        self.samples = self.bytes = 0
        self.start = self.last = time.monotonic()
        self.drawn = False

    def add(self, samples: int, nbytes: int) -> None:
        self.samples += samples
        self.bytes += nbytes
        now = time.monotonic()
        if self.on and (not self.drawn or now - self.last >= 0.2):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.bytes / max(now - self.start, 1e-9) / 1e6
        of = f"/{self.total}" if self.total else ""
        pct = f" {100 * self.samples / self.total:3.0f}%" if self.total else ""
        sys.stderr.write(f"\r{self.what}:{pct} {self.samples}{of} samples, {self.bytes / 1e6:.1f} MB, {rate:.0f} MB/s ")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.drawn = False


#: A field spec: ``"bytes"``, ``"list<dtype>"`` (a variable-length 1-D sequence, e.g.
#: ``"list<u32>"`` for token ids) or ``(dtype_name, shape)``.
FieldSpec = Union[str, Tuple[str, Sequence[int]]]


def _to_numpy(value: Any) -> Tuple[Any, Optional[str]]:
    """A NumPy array (or bytes) for a sample value, and its dtype name if forced."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), "bytes"
    if isinstance(value, str):  # a bytes field holding UTF-8 (Loader(strings=[...]) decodes it)
        return value.encode("utf-8"), "bytes"
    mod = type(value).__module__
    if mod.startswith("torch"):
        import torch

        if value.dtype == torch.bfloat16:
            return value.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16), "bf16"
        return value.detach().cpu().contiguous().numpy(), None
    # asarray, not ascontiguousarray: a scalar stays 0-d (shape []), it does not become [1].
    return np.asarray(value, order="C"), None


def _field_of(value: Any) -> Tuple[str, Tuple[int, ...]]:
    arr, forced = _to_numpy(value)
    if forced == "bytes":
        return "bytes", ()
    if forced is not None:
        return forced, tuple(arr.shape)
    dt = _NP_TO_DTYPE.get(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder in "=|<" else None
    if dt is None:
        raise TypeError(f"unsupported dtype {arr.dtype}; use one of {sorted(str(d) for d in _NP_TO_DTYPE)}, torch.bfloat16 or bytes")
    return dt, tuple(arr.shape)


def _spec(name: str, v: Any) -> Tuple[str, Tuple[int, ...]]:
    """A schema entry as (dtype name, "bytes" or "list<dtype>", shape)."""
    if v == "bytes":
        return "bytes", ()
    if isinstance(v, str) and v.startswith("list<") and v.endswith(">"):
        if v[5:-1] not in _DTYPE_TO_NP:
            raise ValueError(f"field {name!r}: {v!r} names no dtype (list<u16>, list<u32>, list<i32>, list<i64>, ...)")
        return v, ()
    if isinstance(v, str):
        raise ValueError(f"field {name!r}: {v!r} is not a field spec: give 'bytes', 'list<dtype>' or (dtype, shape)")
    return v[0], tuple(v[1])


class Writer:
    """Writes an encrypted dataset: one shard per ``shard_size`` bytes of plaintext,
    a fresh data key per shard wrapped by the keyring's KEK (``keyring`` is a keyring
    file or a ``pkcs11:`` URI of a KEK in an HSM), and a manifest signed by the issuer
    key. Until :meth:`close` (or the end of a ``with`` block) succeeds,
    the output does not read as a dataset; an exception inside ``with`` abandons it.

    ``schema`` maps field names to ``"bytes"``, ``(dtype, shape)`` (dtype names:
    u8 i8 i16 u16 i32 u32 i64 u64 f16 bf16 f32 f64 bool) or ``"list<dtype>"``, a
    variable-length 1-D sequence such as a document's token ids (``"list<u32>"``; each
    sample's value is a 1-D array of any length, read back as ``(values, offsets)``
    with offsets counted in elements); by default it is inferred from the first sample
    written. A scalar (Python or NumPy number, 0-d array) has
    shape ``[]`` and comes back as a ``(batch,)`` tensor; a ``bool`` is a ``bool``
    field; a ``str`` is stored as its UTF-8 bytes in a bytes field (read it back as
    ``str`` with ``Loader(strings=[name])``).

    ``shard_size`` is a byte count or a size as the CLI writes it (``"64MiB"``).

    ``progress`` shows a progress line on stderr (samples, MB, MB/s), by default when
    stderr is a terminal.

    ``metadata`` (a dict of JSON values) is signed with the manifest and read back as
    ``Loader.metadata``; ``metadata["classes"]``, the label names in label order, as
    ``Loader.classes``.

    ``part=(first, count)`` packs one part of a dataset packed by several processes or
    machines: shards ``first`` to ``first + count - 1`` (``count`` ``None``: the last
    part). ``issuer_key`` is then the issuer's *public* key (``issuer.key.pub``): no
    worker needs the secret key. ``close()`` writes a part file, and once every part is
    in, :func:`assemble` verifies them and signs the manifest. When a worker cannot know
    its range in advance, ``part`` is a callable returning the index of each shard the
    worker starts, from a counter every worker shares (what
    :class:`shardlock.ray.Datasink` does with a Ray actor); an index it hands out that
    no part writes (a failed worker) is a gap :func:`assemble` refuses. A part may go
    straight to object storage: ``out_dir="s3://bucket/prefix"`` (with
    ``storage_options`` as for :class:`shardlock.Loader`) uploads each shard as soon as
    it is sealed, from a private staging directory, and the part file last; then
    ``assemble("s3://bucket/prefix", ...)``.

    ``compress`` stores the values of the fields it names compressed, each value its own
    zstd frame, e.g. ``{"tokens": "zstd", "json": "zstd:9"}`` (level 1-19, default 3):
    smaller shards for data that compresses (token ids, text, raw pixels with flat
    areas; not JPEGs), decompressed on the loader's decrypt workers, with random
    access, dtypes and shapes as before. Compression runs on the sealing threads;
    ``shard_size`` counts values before compression.

    ``generation`` is the new manifest's generation: by default one past the dataset
    this replaces (``force=True``, same dataset id, signed by the same issuer), else 1;
    a value not above the replaced one is refused, so generations only go up.

        >>> with shardlock.Writer("out/", keyring="kr.json", issuer_key="issuer.key",
        ...                       dataset_id="my/data") as w:
        ...     w.write({"image": img, "label": np.int64(3)})
    """

    def __init__(
        self,
        out_dir: PathLike,
        *,
        keyring: PathLike,
        issuer_key: PathLike,
        dataset_id: str,
        schema: Optional[Mapping[str, FieldSpec]] = None,
        shard_size: Union[int, str] = 256 << 20,
        force: bool = False,
        generation: Optional[int] = None,
        progress: Optional[bool] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        part: Union[Tuple[int, Optional[int]], Callable[[], int], None] = None,
        compress: Optional[Mapping[str, str]] = None,
        storage_options: Optional[Mapping[str, Union[str, int, bool, float, "os.PathLike[str]"]]] = None,
    ) -> None:
        self._progress = _Progress(progress, "packing")
        self._storage = _storage_options(storage_options)
        self._compress = _compress_specs(compress)
        try:
            self._metadata = None if metadata is None else json.dumps(dict(metadata))
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be a dict of JSON values: {e}") from None
        self._args = (os.fspath(out_dir), os.fspath(keyring), os.fspath(issuer_key), dataset_id, _size_arg("shard_size", shard_size), bool(force))
        self._generation = None if generation is None else int(generation)
        self._part: Union[Tuple[int, Optional[int]], Callable[[], int], None]
        if part is None or callable(part):
            self._part = part
        else:
            first, count = part
            self._part = (int(first), None if count is None else int(count))
        self._native: Optional[NativeWriter] = None
        self._names: List[str] = []
        self._specs: List[Tuple[str, Tuple[int, ...]]] = []
        self._closed = False
        #: The number of shards written, once closed.
        self.shards: Optional[int] = None
        if schema is not None:
            self._open({k: _spec(k, v) for k, v in schema.items()})

    def _open(self, fields: Mapping[str, Tuple[str, Tuple[int, ...]]]) -> None:
        out, kr, ik, ds, size, force = self._args
        self._names = list(fields)
        self._specs = [fields[n] for n in self._names]
        self._native = NativeWriter(
            out, kr, ik, ds, [(n, d, list(s)) for n, (d, s) in zip(self._names, self._specs)], size, force, self._generation,
            self._metadata, self._part, self._compress, self._storage,
        )

    def _check_names(self, keys: Any) -> None:
        if set(keys) != set(self._names):
            raise ValueError(f"sample fields {sorted(keys)} do not match the schema {self._names}")

    def write(self, sample: Mapping[str, Any]) -> None:
        """Appends one sample: a dict of field name -> array, tensor, scalar or bytes."""
        if self._closed:
            raise ValueError("this Writer is closed")
        if self._native is None:
            self._open({k: _field_of(v) for k, v in sample.items()})
        self._check_names(sample.keys())
        values = []
        for name, (dt, shape) in zip(self._names, self._specs):
            arr, forced = _to_numpy(sample[name])
            if dt == "bytes":
                if forced != "bytes":
                    raise TypeError(f"field {name!r} holds bytes; got {type(sample[name]).__name__}")
                values.append(arr)
            elif dt.startswith("list<"):
                if forced == "bytes" or arr.ndim != 1:
                    raise FormatError(f"field {name!r} is a {dt}: give a 1-D array or list; got "
                                      f"{'bytes' if forced == 'bytes' else f'shape {list(arr.shape)}'}")
                values.append(_as_field(name, sample[name], arr, forced, dt[5:-1], tuple(arr.shape)).tobytes())
            else:
                values.append(_as_field(name, sample[name], arr, forced, dt, shape).tobytes())
        assert self._native is not None
        self._native.write_sample(values)
        self._progress.add(1, sum(len(v) for v in values))

    def write_batch(self, arrays: Mapping[str, Any]) -> None:
        """Appends many samples of fixed-shape fields: a dict of arrays whose first
        axis is the sample axis. (Use :meth:`write` for bytes fields.)"""
        if self._closed:
            raise ValueError("this Writer is closed")
        cols = {k: _to_numpy(v) for k, v in arrays.items()}
        lengths = {k: (len(a) if f != "bytes" else -1) for k, (a, f) in cols.items()}
        if any(f == "bytes" for _, f in cols.values()):
            raise TypeError("write_batch takes arrays; write bytes fields one sample at a time with write()")
        n = next(iter(lengths.values()), 0)
        if any(v != n for v in lengths.values()):
            raise ValueError(f"arrays have different first-axis lengths: {lengths}")
        if self._native is None:
            fields = {}
            for k, (a, forced) in cols.items():
                if forced is None:
                    dt, _ = _field_of(np.empty((0,), dtype=a.dtype))
                else:
                    dt = forced
                fields[k] = (dt, tuple(a.shape[1:]))
            self._open(fields)
        self._check_names(cols.keys())
        data = []
        for name, (dt, shape) in zip(self._names, self._specs):
            a, forced = cols[name]
            if dt == "bytes" or dt.startswith("list<"):
                raise TypeError(f"field {name!r} is variable-length: write it one sample at a time with write()")
            data.append(_as_field(name, a, a, forced, dt, (len(a), *shape)).tobytes())
        assert self._native is not None
        # In slices, so the progress line moves and an interrupt is seen between them.
        step = max(1, (64 << 20) // max(1, sum(len(d) for d in data) // max(n, 1)))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            part = [d[lo * (len(d) // n):hi * (len(d) // n)] for d in data] if n else data
            self._native.write_columns(part, hi - lo)
            self._progress.add(hi - lo, sum(len(p) for p in part))

    def _write_columns(self, data: List[bytes], n: int, offsets: List[Optional[bytes]]) -> None:
        """Appends ``n`` samples already laid out per field in schema order: fixed
        fields as ``n`` values back to back (little-endian, C order), variable fields
        as their bytes plus ``n + 1`` little-endian u64 offsets (for :func:`shardlock.pack`)."""
        if self._closed or self._native is None:
            raise ValueError("this Writer is closed or has no schema")
        self._native.write_columns(data, n, offsets if any(o is not None for o in offsets) else None)
        self._progress.add(n, sum(len(d) for d in data))

    def _write_source(self, source: Any) -> None:
        """Appends every sample of a native source (``_lib.NativeSource``: WebDataset
        tars, an image folder), read and packed in Rust."""
        if self._closed or self._native is None:
            raise ValueError("this Writer is closed or has no schema")
        n, nbytes = self._native.write_source(source)
        self._progress.add(n, nbytes)

    def close(self) -> int:
        """Seals the last shard and writes the signed manifest; returns the record count."""
        if self._closed:
            raise ValueError("this Writer is already closed")
        self._closed = True
        self._progress.close()
        if self._native is None:
            raise ValueError("nothing was written: a dataset needs a schema (pass schema= or write a sample)")
        records, self.shards = self._native.finish()
        return records

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._closed = True
            self._progress.close()
            if self._native is not None:
                self._native.abort()
            return
        self.close()


def _compress_specs(compress: Optional[Mapping[str, str]]) -> List[str]:
    """``{"field": "zstd[:LEVEL]"}`` as the ``FIELD=zstd[:LEVEL]`` specs the CLI takes."""
    if compress is None:
        return []
    if not isinstance(compress, Mapping):
        raise TypeError(f"compress must map field names to 'zstd' or 'zstd:LEVEL'; got {type(compress).__name__}")
    return [f"{k}={v}" for k, v in compress.items()]


def pack_numpy(
    out_dir: PathLike,
    arrays: Dict[str, Any],
    *,
    keyring: PathLike,
    issuer_key: PathLike,
    dataset_id: str,
    shard_size: Union[int, str] = 256 << 20,
    force: bool = False,
    generation: Optional[int] = None,
    progress: Optional[bool] = None,
    compress: Optional[Mapping[str, str]] = None,
) -> int:
    """Packs a dict of arrays (first axis = samples) into an encrypted dataset;
    returns the record count. ``progress`` shows a progress line on stderr (default:
    when stderr is a terminal); ``compress`` is :class:`Writer`'s."""
    w = Writer(
        out_dir, keyring=keyring, issuer_key=issuer_key, dataset_id=dataset_id, shard_size=shard_size, force=force,
        generation=generation, progress=progress, compress=compress,
    )
    try:
        w.write_batch(arrays)
    except BaseException:
        w.__exit__(Exception, None, None)
        raise
    return w.close()


def assemble(dir: PathLike, *, issuer_key: PathLike, keyring: Union[PathLike, Sequence[PathLike]],
             generation: Optional[int] = None,
             storage_options: Optional[Mapping[str, Union[str, int, bool, float, "os.PathLike[str]"]]] = None) -> Tuple[int, int]:
    """Verifies the parts a partitioned pack wrote into ``dir`` (``Writer(part=...)``,
    ``shardlock pack --part``) and signs the dataset's manifest with ``issuer_key``;
    returns ``(records, shards)``. Part files are unsigned, so every shard is
    authenticated under its own DEK, unwrapped with ``keyring`` (the custody the parts
    were packed with; a list for several), before anything is signed. A gap, an overlap,
    a changed or foreign shard, or parts of different datasets raise
    :class:`shardlock.FormatError` naming the part and shard. ``dir`` may be the
    ``s3://bucket/prefix`` the parts were written to: they and their shards are
    downloaded (ciphertext) into a private staging directory, verified there, and the
    signed manifest is uploaded last."""
    specs = list(keyring) if isinstance(keyring, (list, tuple)) else [keyring]
    return tuple(_assemble(os.fspath(dir), os.fspath(issuer_key), [os.fspath(k) for k in specs], generation,  # type: ignore[return-value]
                           _storage_options(storage_options)))
