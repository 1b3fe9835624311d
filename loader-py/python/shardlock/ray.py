"""Packing from Ray Data: ``ds.write_datasink(shardlock.ray.Datasink(out_dir, ...))``.

Every Ray write task packs its blocks as one part of the dataset (see
docs/PACKING.md, "One dataset, many workers"), with the KEK provider and only the
issuer's *public* key; no task holds the issuer's secret key. A task cannot know in
advance how many shards its blocks fill, so each shard's index comes from one Ray actor
that counts for the whole write (``Writer(part=callable)``): the indices of all tasks
run from 0 with no gap. Once every task has finished, the driver records how many
indices were handed out (``leases.json``) and assembles the parts (``assemble_key=``,
the issuer's secret key) or leaves them for the data owner's ``shardlock assemble``. A
failed write is recorded as failed, and a write whose tasks returned fewer shards than
were handed out (a task failed or was retried) too, so ``assemble`` refuses the
directory (pack it again) rather than signing a partial or duplicated dataset.

Columns map to fields as in :func:`shardlock.pack` (one field per column); Ray's
fixed-shape tensor columns (what ``ray.data.from_numpy`` and ``map_batches`` returning
arrays make) are tensor fields of that shape. The output directory must be one every
write task can reach (a shared file system on a multi-node cluster). Records are in the
order the tasks packed them, not the dataset's: shuffle when reading.

    >>> ds = ray.data.read_parquet("s3://bucket/train/")
    >>> ds.write_datasink(shardlock.ray.Datasink(
    ...     "/shared/train.slk", keyring="keyring.json", issuer_key="issuer.key.pub",
    ...     dataset_id="train", assemble_key="issuer.key"))
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, cast

try:
    import ray
    from ray.data import Datasink as _RayDatasink
    from ray.data.block import BlockAccessor
except ImportError:  # pragma: no cover - exercised only without ray
    raise ImportError("shardlock.ray needs Ray Data: pip install 'ray[data]'") from None

from shardlock import ingest
from shardlock._lib import write_leases
from shardlock.writer import Writer, _size_arg

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["Datasink"]


@ray.remote(num_cpus=0)
class _ShardCounter:
    """Hands out shard indices 0, 1, 2, ... to the write tasks of one dataset."""

    def __init__(self) -> None:
        self._next = 0

    def next(self) -> int:
        n = self._next
        self._next += 1
        return n

    def issued(self) -> int:
        return self._next


class Datasink(_RayDatasink):
    """A Ray Data datasink that packs a dataset into an encrypted shardlock dataset.

    ``keyring`` is the KEK provider every write task wraps DEKs with (a keyring file,
    ``pkcs11:``, ``aws-kms:``, ``transit:`` or a key service URL); ``issuer_key`` the
    issuer's public key (``issuer.key.pub``). ``columns`` picks columns, in that order;
    ``shard_size``, ``metadata`` and ``compress`` are :class:`shardlock.Writer`'s.

    ``assemble_key`` (the issuer's secret key) makes the driver assemble and sign the
    dataset once every task has finished, authenticating every shard with
    ``assemble_keyring`` (default ``keyring``); without it, the parts wait for
    ``shardlock assemble``. After the write, :attr:`records` and :attr:`shards` hold
    what was packed.
    """

    def __init__(
        self,
        out_dir: PathLike,
        *,
        keyring: PathLike,
        issuer_key: PathLike,
        dataset_id: str,
        columns: Optional[Sequence[str]] = None,
        shard_size: Union[int, str] = 256 << 20,
        metadata: Optional[Mapping[str, Any]] = None,
        assemble_key: Optional[PathLike] = None,
        assemble_keyring: Optional[PathLike] = None,
        compress: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self._keyring = os.fspath(keyring)
        self._issuer_key = os.fspath(issuer_key)
        self._dataset_id = dataset_id
        self._columns = list(columns) if columns else None
        self._shard_size = _size_arg("shard_size", shard_size)
        self._metadata = dict(metadata) if metadata is not None else None
        self._compress = dict(compress) if compress is not None else None
        self._assemble_key = None if assemble_key is None else os.fspath(assemble_key)
        self._assemble_keyring = os.fspath(assemble_keyring) if assemble_keyring is not None else self._keyring
        # The counter actor is found by name, so it does not matter when Ray copies the sink.
        self._counter_name = f"shardlock-shards-{uuid.uuid4().hex}"
        self._counter: Any = None
        #: Records and shards packed, once the write has finished.
        self.records: Optional[int] = None
        self.shards: Optional[int] = None

    def get_name(self) -> str:
        return "shardlock"

    def on_write_start(self, schema: Any = None) -> None:
        if os.path.exists(os.path.join(self.out_dir, "manifest.json")):
            raise FileExistsError(f"{self.out_dir} already holds a dataset (manifest.json): write into a new directory")
        self._counter = _ShardCounter.options(name=self._counter_name).remote()  # type: ignore[attr-defined]

    def write(self, blocks: Iterable[Any], ctx: Any) -> Dict[str, int]:
        counter = ray.get_actor(self._counter_name)

        def lease() -> int:
            return cast(int, ray.get(counter.next.remote()))

        def batches() -> Iterator[Tuple[Any, str]]:
            for i, block in enumerate(blocks):
                table = BlockAccessor.for_block(block).to_arrow()
                if self._columns:
                    table = table.select(self._columns)
                for b in table.to_batches(max_chunksize=ingest._BATCH_ROWS):
                    yield b, f"write task {ctx.task_idx}, block {i}, "

        w = ingest._write_batches(batches(), lambda specs: Writer(
            self.out_dir, keyring=self._keyring, issuer_key=self._issuer_key, dataset_id=self._dataset_id,
            schema=specs, shard_size=self._shard_size, metadata=self._metadata, progress=False, part=lease,
            compress=self._compress))
        if w is None:
            return {"records": 0, "shards": 0}
        records = w.close()
        return {"records": records, "shards": w.shards or 0}

    def on_write_complete(self, write_result: Any) -> None:
        returns: List[Dict[str, int]] = list(getattr(write_result, "write_returns", write_result) or [])
        issued = int(ray.get(self._counter.issued.remote()))
        self._stop_counter()
        self.records = sum(r["records"] for r in returns)
        self.shards = sum(r["shards"] for r in returns)
        os.makedirs(self.out_dir, exist_ok=True)
        if self.shards != issued:
            # A retried task's first attempt may have written a whole part: refuse the directory.
            why = f"the write tasks took {issued} shard indices and returned {self.shards} shards"
            write_leases(self.out_dir, issued, why)
            raise RuntimeError(f"{why}: a task failed or was retried; pack {self.out_dir} again into a new directory")
        # Recorded for any later assemble: exactly these shards, no more and no fewer.
        write_leases(self.out_dir, issued)
        if self._assemble_key is not None:
            from shardlock import assemble

            self.records, self.shards = assemble(self.out_dir, issuer_key=self._assemble_key,
                                                 keyring=self._assemble_keyring)

    def on_write_failed(self, error: Exception) -> None:
        # The parts that were written stay, but no assemble accepts them.
        issued = 0
        if self._counter is not None:
            try:
                issued = int(ray.get(self._counter.issued.remote()))
            except Exception:  # the actor may be gone with the failure
                pass
        self._stop_counter()
        if os.path.isdir(self.out_dir):
            write_leases(self.out_dir, issued, f"the Ray write failed: {type(error).__name__}")

    def _stop_counter(self) -> None:
        if self._counter is not None:
            ray.kill(self._counter)
            self._counter = None
