"""Packing tables and tars: :func:`pack` from Parquet, Arrow IPC, a ``pyarrow`` table
or record-batch reader, a Hugging Face ``datasets.Dataset`` / ``IterableDataset``, or
WebDataset ``.tar`` shards.

Each column becomes one field, converted column by column (no Python per row):

=================================================  =====================================
Arrow type                                         shardlock field
=================================================  =====================================
integer, float (16/32/64), bool                    tensor of shape ``[]`` (``bool``)
``fixed_size_list`` (nested for more dimensions)   tensor of that shape
``arrow.fixed_shape_tensor`` extension             tensor of its shape
``binary``, ``large_binary``                       bytes
``string``, ``large_string``                       bytes holding UTF-8 (read back as
                                                   ``str`` with ``Loader(strings=[...])``)
``list``/``large_list`` of integers, floats, bools ``list<dtype>``, variable length (token
                                                   ids; read back as values + offsets)
=================================================  =====================================

WebDataset tars and image folders are read and packed by the Rust packer, the same
code as ``shardlock pack --format wds|imagefolder``. WebDataset tars: members are grouped into samples by key (the member's path up to the
first dot of its file name: ``a/000123.jpg`` and ``a/000123.cls`` are sample
``a/000123``), one bytes field per extension (``jpg``, ``cls``, ``json``, ...);
``parse={"cls": "i64"}`` stores an extension's integer text as an i64 scalar instead.
Every sample must have the same extensions as the first.

Image folders (torchvision's ``ImageFolder`` layout, ``root/<class>/<file>``): fields
``image`` (the encoded file, untouched) and ``label`` (i64, the class's index in sorted
order, as torchvision numbers them); :func:`image_folder_classes` gives the names, which are signed with the manifest
(``metadata["classes"]``) and read back as ``Loader.classes``.

Nulls, a type not in the table (nested lists among them), and a file whose schema differs from the first raise
:class:`shardlock.FormatError` naming the file, row group, row and column.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from shardlock._lib import IMAGE_EXTENSIONS as _IMAGE_EXTENSIONS
from shardlock._lib import FormatError, NativeSource
from shardlock.writer import Writer

PathLike = Union[str, "os.PathLike[str]"]

#: Arrow integer/float/bool type name -> shardlock dtype.
_ARROW_DTYPES = {
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
    "uint8": "u8", "uint16": "u16", "uint32": "u32", "uint64": "u64",
    "halffloat": "f16", "float": "f32", "double": "f64", "bool": "bool",
}

_BATCH_ROWS = 8192

#: Ray Data's fixed-shape tensor extension types (``ray.data.from_numpy``, ``map_batches``).
_RAY_TENSORS = ("ray.data.arrow_tensor", "ray.data.arrow_tensor_v2")


def _pa() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise ImportError("shardlock.pack of tables needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _field_spec(name: str, t: Any, where: str) -> Tuple[str, Tuple[int, ...]]:
    """(dtype or "bytes", shape) for Arrow type ``t`` of column ``name``."""
    pa = _pa()
    if isinstance(t, pa.BaseExtensionType) and t.extension_name == "arrow.fixed_shape_tensor":
        dt, inner = _field_spec(name, t.storage_type, where)
        return dt, tuple(int(d) for d in t.shape)
    if isinstance(t, pa.BaseExtensionType) and t.extension_name in _RAY_TENSORS:
        # Ray Data's fixed-shape tensor column: a list of the elements, the shape in the type.
        dt, _ = _field_spec(name, t.storage_type.value_type, where)
        return dt, tuple(int(d) for d in t.shape)
    if pa.types.is_fixed_size_list(t):
        dt, inner = _field_spec(name, t.value_type, where)
        if dt == "bytes":
            raise FormatError(f"{where}column {name!r}: a fixed-size list of {t.value_type} is not a tensor")
        return dt, (t.list_size, *inner)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return "bytes", ()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        dt, inner = _field_spec(name, t.value_type, where) if str(t.value_type) in _ARROW_DTYPES else ("", ())
        if not dt:
            raise FormatError(f"{where}column {name!r} has Arrow type {t}: a variable-length list must hold integers, "
                              f"floats or bools (nested lists are not supported)")
        return f"list<{dt}>", ()
    dt = _ARROW_DTYPES.get(str(t))
    if dt is None:
        raise FormatError(f"{where}column {name!r} has Arrow type {t}, which shardlock cannot store")
    return dt, ()


def _first_null(arr: Any) -> Optional[int]:
    pa = _pa()
    if arr.null_count == 0:
        return None
    import pyarrow.compute as pc

    mask = pc.is_null(arr).to_numpy(zero_copy_only=False)
    return int(np.flatnonzero(mask)[0]) if mask.any() else None


def _column_bytes(name: str, arr: Any, spec: Tuple[str, Tuple[int, ...]], where: str,
                  row0: int) -> Tuple[bytes, Optional[bytes]]:
    """One column of a batch as (values, offsets or None) for ``write_columns``."""
    pa = _pa()
    dt, shape = spec
    levels = len(shape)  # list levels to flatten down to the elements
    if isinstance(arr.type, pa.BaseExtensionType):  # a fixed-shape tensor: one flat list
        arr, levels = arr.storage, 1
    null = _first_null(arr)
    if null is not None:
        raise FormatError(f"{where}row {row0 + null}, column {name!r}: null value (shardlock fields have no nulls)")
    n = len(arr)
    if (dt == "bytes" or dt.startswith("list<")) and n == 0:
        return b"", np.zeros(1, dtype="<u8").tobytes()
    if dt.startswith("list<"):
        # Arrow's layout already: the elements back to back and n + 1 offsets.
        offs = np.asarray(arr.offsets).astype(np.int64)
        start, end = int(offs[0]), int(offs[-1])
        leaf = arr.values.slice(start, end - start)
        null = _first_null(leaf)
        if null is not None:
            row = int(np.searchsorted(offs, start + null, side="right")) - 1
            raise FormatError(f"{where}row {row0 + row}, column {name!r}: null element in a list")
        values = leaf.to_numpy(zero_copy_only=False)
        if dt == "list<bool>":
            values = values.astype(np.bool_)
        size = values.dtype.itemsize
        data = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
        return data, ((offs - start) * size).astype("<u8").tobytes()
    if dt == "bytes":
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            arr = arr.cast(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())
        offsets_dtype = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
        bufs = arr.buffers()
        offs = np.frombuffer(bufs[1], dtype=offsets_dtype)[arr.offset:arr.offset + n + 1].astype("<u8")
        start, end = int(offs[0]), int(offs[-1])
        values = b"" if bufs[2] is None else bufs[2].slice(start, end - start).to_pybytes()
        return values, (offs - start).tobytes()
    leaf = arr
    for _ in range(levels):
        if leaf.null_count:
            raise FormatError(f"{where}column {name!r}: null list (shardlock fields have no nulls)")
        leaf = leaf.flatten()
    null = _first_null(leaf)
    if null is not None:
        inner = int(np.prod(shape)) if shape else 1
        raise FormatError(f"{where}row {row0 + null // inner}, column {name!r}: null element")
    values = leaf.to_numpy(zero_copy_only=False)
    if dt == "bool":
        values = values.astype(np.bool_)
    want = n * (int(np.prod(shape)) if shape else 1)
    if values.size != want:
        raise FormatError(f"{where}column {name!r}: {values.size} elements for {n} rows of shape {list(shape)}")
    return np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False).tobytes(), None


def _batches(source: Any, columns: Optional[Sequence[str]]) -> Iterator[Tuple[Any, str]]:
    """(record batch, where it came from for errors) from any supported source."""
    pa = _pa()
    if isinstance(source, (str, os.PathLike)):
        yield from _file_batches(os.fspath(source), columns)
        return
    mod = type(source).__module__
    if mod.startswith("datasets"):
        ds = source.with_format("arrow")
        for i, t in enumerate(ds.iter(batch_size=_BATCH_ROWS)):
            t = t.select(list(columns)) if columns else t
            for b in t.to_batches():
                yield b, ""
        return
    if isinstance(source, pa.Table):
        t = source.select(list(columns)) if columns else source
        for b in t.to_batches(max_chunksize=_BATCH_ROWS):
            yield b, ""
        return
    if isinstance(source, pa.RecordBatch):
        yield (source.select(list(columns)) if columns else source), ""
        return
    if isinstance(source, pa.RecordBatchReader):
        for b in source:
            yield (b.select(list(columns)) if columns else b), ""
        return
    raise TypeError(f"shardlock.pack takes a Parquet/Arrow path, a pyarrow Table, RecordBatch or RecordBatchReader, "
                    f"a datasets.Dataset or IterableDataset, or a dict of arrays; not {type(source).__name__}")


def _file_batches(path: str, columns: Optional[Sequence[str]]) -> Iterator[Tuple[Any, str]]:
    import pyarrow.parquet as pq

    pa = _pa()
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if not f.startswith(".") and f.endswith((".parquet", ".arrow", ".feather", ".ipc")))
        if not files:
            raise FormatError(f"{path}: no .parquet or .arrow files in the directory")
    elif os.path.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(2, "no such Parquet/Arrow file or directory", path)
    for f in files:
        if f.endswith(".parquet"):
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:
                raise FormatError(f"{f}: not a readable Parquet file ({e})") from None
            # The next row group is read (pyarrow, without the GIL) while this one packs.
            cols = list(columns) if columns else None
            with ThreadPoolExecutor(1, thread_name_prefix="shardlock-parquet") as ex:
                ahead = ex.submit(pf.read_row_group, 0, columns=cols) if pf.num_row_groups else None
                for g in range(pf.num_row_groups):
                    assert ahead is not None
                    t = ahead.result()
                    ahead = ex.submit(pf.read_row_group, g + 1, columns=cols) if g + 1 < pf.num_row_groups else None
                    for b in t.to_batches(max_chunksize=_BATCH_ROWS):
                        yield b, f"{f}, row group {g}, "
        else:
            try:
                reader = pa.ipc.open_file(f)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except Exception:
                try:
                    batches = iter(pa.ipc.open_stream(f))
                except Exception as e:
                    raise FormatError(f"{f}: not an Arrow IPC file or stream ({e})") from None
            for b in batches:
                yield (b.select(list(columns)) if columns else b), f"{f}, "


def _is_tar_source(source: Any) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return False
    p = os.fspath(source)
    if os.path.isdir(p):
        names = os.listdir(p)
        return any(n.endswith(".tar") for n in names) and not any(
            n.endswith((".parquet", ".arrow", ".feather", ".ipc")) for n in names)
    return p.endswith(".tar")


#: File extensions taken as images (lower-cased), as torchvision's ``IMG_EXTENSIONS``.
IMAGE_EXTENSIONS = tuple("." + e for e in _IMAGE_EXTENSIONS)


def image_folder_classes(root: PathLike) -> List[str]:
    """The class names of an image folder in label order: its sub-directories, sorted,
    as torchvision's ``ImageFolder`` numbers them. A class directory without an image
    file is a :class:`shardlock.FormatError` (torchvision refuses it too)."""
    return list(json.loads(NativeSource([os.fspath(root)], "imagefolder").metadata_json())["classes"])


def _is_image_folder(source: Any) -> bool:
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return False
    names = os.listdir(source)
    return bool(names) and all(n.startswith(".") or os.path.isdir(os.path.join(source, n)) for n in names)


def _pack_native(path: str, fmt: str, parse: Dict[str, str], out_dir: PathLike, **writer_kw: Any) -> int:
    """Packs WebDataset tars or an image folder with the Rust packer (``shardlock pack``'s)."""
    for ext, how in parse.items():
        if how != "i64":
            raise ValueError(f"parse={{{ext!r}: {how!r}}}: only 'i64' (integer text) is supported")
    src = NativeSource([path], fmt, list(parse))
    schema = {n: "bytes" if d == "bytes" else (d, tuple(shape)) for n, d, shape in src.fields()}
    metadata = json.loads(src.metadata_json()) or None
    w = Writer(out_dir, schema=schema, metadata=metadata, **writer_kw)
    try:
        w._write_source(src)
    except BaseException:
        w.__exit__(Exception, None, None)
        raise
    return w.close()


def pack(
    source: Any,
    out_dir: PathLike,
    *,
    keyring: PathLike,
    issuer_key: PathLike,
    dataset_id: str,
    columns: Optional[Sequence[str]] = None,
    shard_size: Union[int, str] = 256 << 20,
    force: bool = False,
    generation: Optional[int] = None,
    progress: Optional[bool] = None,
    parse: Optional[Dict[str, str]] = None,
    compress: Optional[Dict[str, str]] = None,
) -> int:
    """Packs a table into an encrypted dataset, one field per column (``columns``
    picks some, in that order); returns the record count. ``source`` is a Parquet
    file, Arrow IPC file, or a directory of them (read in name order), a
    ``pyarrow.Table``/``RecordBatch``/``RecordBatchReader``, a Hugging Face
    ``datasets.Dataset`` or ``IterableDataset`` (read as Arrow), or a dict of NumPy
    arrays (as :func:`shardlock.pack_numpy`), or a WebDataset ``.tar`` file or
    directory of them (``parse`` turns extensions holding integer text into i64
    fields, e.g. ``{"cls": "i64"}``), or an image folder (``root/<class>/<file>``:
    ``image`` bytes and ``label``; see :func:`image_folder_classes`). ``compress``
    (``{"field": "zstd[:LEVEL]"}``) stores those fields' values zstd-compressed. The other arguments are
    :class:`shardlock.Writer`'s. Nothing reads as a dataset unless every row packed."""
    if _is_image_folder(source) and not _is_tar_source(source):
        if parse:
            raise ValueError("parse= is for WebDataset tars")
        return _pack_native(os.fspath(source), "imagefolder", {}, out_dir, keyring=keyring, issuer_key=issuer_key,
                            dataset_id=dataset_id, shard_size=shard_size, force=force, generation=generation,
                            progress=progress, compress=compress)
    if _is_tar_source(source):
        # "auto": the Rust packer refuses a directory of tars among other files (none left out silently).
        return _pack_native(os.fspath(source), "auto", dict(parse or {}), out_dir, keyring=keyring,
                            issuer_key=issuer_key, dataset_id=dataset_id, shard_size=shard_size, force=force,
                            generation=generation, progress=progress, compress=compress)
    if parse:
        raise ValueError("parse= is for WebDataset tars")
    if isinstance(source, dict):
        from shardlock.writer import pack_numpy

        return pack_numpy(out_dir, source, keyring=keyring, issuer_key=issuer_key, dataset_id=dataset_id,
                          shard_size=shard_size, force=force, generation=generation, progress=progress,
                          compress=compress)
    w = _write_batches(_batches(source, columns), lambda specs: Writer(
        out_dir, keyring=keyring, issuer_key=issuer_key, dataset_id=dataset_id, schema=specs, shard_size=shard_size,
        force=force, generation=generation, progress=progress, compress=compress))
    if w is None:
        raise FormatError("the source holds no batches, so there is no schema to pack")
    return w.close()


def _write_batches(batches: Iterator[Tuple[Any, str]],
                   open_writer: Callable[[Dict[str, Tuple[str, Tuple[int, ...]]]], Writer]) -> Optional[Writer]:
    """Writes Arrow record batches (with where each came from, for errors) into the
    writer ``open_writer`` makes from the first batch's field specs; returns it, still
    open, or ``None`` for no batches. Every batch must have the first one's schema; on
    any error the writer is abandoned (no manifest or part file) and the error raised."""
    w: Optional[Writer] = None
    specs: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    first_schema: Any = None
    rows = 0
    try:
        for batch, where in batches:
            if first_schema is None:
                first_schema = batch.schema
                specs = {f.name: _field_spec(f.name, f.type, where) for f in batch.schema}
                w = open_writer(specs)
            elif not batch.schema.equals(first_schema, check_metadata=False):
                raise FormatError(f"{where}schema {batch.schema.to_string(show_schema_metadata=False)!r} differs from "
                                  f"the first batch's {first_schema.to_string(show_schema_metadata=False)!r}")
            assert w is not None
            cols: List[bytes] = []
            offs: List[Optional[bytes]] = []
            for name, arr in zip(batch.schema.names, batch.columns):
                values, offsets = _column_bytes(name, arr, specs[name], where, rows)
                cols.append(values)
                offs.append(offsets)
            w._write_columns(cols, batch.num_rows, offs)
            rows += batch.num_rows
    except BaseException:
        if w is not None:
            w.__exit__(Exception, None, None)
        raise
    return w
