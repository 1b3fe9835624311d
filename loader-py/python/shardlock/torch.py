"""PyTorch integration: :class:`IterableDataset` and :class:`DataLoader`.

The one-call form::

    ds = shardlock.torch.IterableDataset("data/", keyring=..., token=..., trust=..., batch_size=256)
    dl = shardlock.torch.DataLoader(ds, num_workers=2)
    for epoch in range(3):
        for batch in dl:              # a new epoch each pass, in every worker
            ...
    state = dl.state_dict()          # what was delivered; restores with any num_workers

A plain ``torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)`` works too
(shardlock already batches: a DataLoader ``batch_size`` would stack batches, and a
warning says so). The rules, the same with and without workers:

- **Epochs.** Every pass over the DataLoader reads the next epoch, in every worker
  (the epoch is shared with the worker processes, so it advances without
  ``persistent_workers``); :meth:`IterableDataset.set_epoch` sets the next one.
- **Workers.** Each DataLoader worker builds its own :class:`shardlock.Loader`
  inside the worker process (never across a fork) and reads every ``num_workers``-th
  batch of its rank's epoch, so the DataLoader delivers the same batches in the same
  order as one :class:`shardlock.Loader` on that rank, ``drop_last`` drops at most one
  partial batch per rank, and ``drop_last=False`` delivers every sample once.
- **Ranks** come from ``torch.distributed``, else ``RANK``/``WORLD_SIZE`` (torchrun),
  else 0 of 1 (see :class:`shardlock.Loader`).
- **Errors** raised in a worker arrive in the training process with their class and
  their attributes (``.reason``, ``.shard``, ...).
- **Resume.** :meth:`DataLoader.state_dict` is the rank's state after the batches it
  delivered: restore it with any worker count. torchdata's ``StatefulDataLoader``
  works too (its per-worker states restore with the same ``num_workers``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.context
import os
import re
import sys
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch.utils.data

from shardlock._lib import ShardlockError
from shardlock.loader import Loader, _check_args, _check_files, _rank_world

__all__ = ["DataLoader", "IterableDataset"]

logger = logging.getLogger("shardlock")

#: Most DataLoader workers one dataset object serves (the size of its shared table).
MAX_WORKERS = 256

# Slots of the table shared with worker processes: the number of the last
# load_state_dict() in the training process, then each worker's next epoch, then the
# load number each worker last applied.
_GEN = 0
_NEXT = 1
_APPLIED = 1 + MAX_WORKERS


def _shared_table(epoch: int) -> Any:
    table = multiprocessing.RawArray("q", 1 + 2 * MAX_WORKERS)
    for w in range(MAX_WORKERS):
        table[_NEXT + w] = epoch
    return table


# Worker errors: a DataLoader sends its class and formatted traceback to the training
# process, which calls the class with that text. The attributes ride on a last line of
# the text and are set back (and the line removed) by ShardlockError's constructor.
_ATTRS = "shardlock-error-attributes: "
_ATTRS_RE = re.compile(r"\n?" + re.escape(_ATTRS) + r"(\{.*\})\s*$")
_ATTR_NAMES = ("reason", "dataset", "shard", "operation", "rule", "kind", "chunk", "provider", "device", "op", "url")


def _install_error_attributes() -> None:
    base_init = ShardlockError.__init__
    if getattr(base_init, "_shardlock_attrs", False):
        return

    def __init__(self: BaseException, *args: Any) -> None:
        base_init(self, *args)
        if len(args) == 1 and isinstance(args[0], str) and _ATTRS in args[0]:
            m = _ATTRS_RE.search(args[0])
            if m:
                try:
                    attrs = json.loads(m.group(1))
                except ValueError:
                    return
                for k, v in attrs.items():
                    if k in _ATTR_NAMES:
                        setattr(self, k, v)
                self.args = (args[0][: m.start()],)

    __init__._shardlock_attrs = True  # type: ignore[attr-defined]
    ShardlockError.__init__ = __init__  # type: ignore[method-assign]


_install_error_attributes()


def _carrying_attributes(e: ShardlockError) -> ShardlockError:
    """``e`` again, its attributes written into its text for the trip to the parent."""
    attrs = {k: getattr(e, k) for k in _ATTR_NAMES if hasattr(e, k) and isinstance(getattr(e, k), (str, int, type(None)))}
    out = type(e)(str(e))
    for k, v in attrs.items():
        setattr(out, k, v)
    out.args = (f"{e}\n{_ATTRS}{json.dumps(attrs)}",)
    return out


def _auto_collating() -> bool:
    """True when the DataLoader calling ``__iter__`` batches what it yields (its
    ``batch_size`` is not None): its fetcher is a caller's ``self``."""
    try:
        from torch.utils.data._utils.fetch import _IterableDatasetFetcher
    except Exception:
        return False
    f = sys._getframe(2)
    for _ in range(8):
        if f is None:
            return False
        s = f.f_locals.get("self")
        if isinstance(s, _IterableDatasetFetcher):
            return bool(getattr(s, "auto_collation", False))
        f = f.f_back
    return False


class IterableDataset(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """A :class:`shardlock.Loader` as a PyTorch ``IterableDataset`` (the module
    docstring has the rules). Takes :class:`shardlock.Loader`'s arguments and checks
    them here, before any worker starts. ``transform`` is called on each batch (a
    ``dict`` of tensors) in the process that reads it, a DataLoader worker included.
    Implements ``state_dict``/``load_state_dict`` (also for torchdata's
    ``StatefulDataLoader``) and ``__len__`` (batches per epoch for this rank)."""

    def __init__(
        self,
        path: "str | os.PathLike[str]",
        *,
        transform: Optional[Callable[[Dict[str, Any]], Any]] = None,
        **loader_kwargs: Any,
    ) -> None:
        super().__init__()
        for name in ("keyring", "token", "trust", "batch_size"):
            if name not in loader_kwargs:
                raise TypeError(f"IterableDataset() missing required keyword argument: {name!r}")
        if "dataloader_worker" in loader_kwargs:
            raise ValueError("dataloader_worker= is set in each DataLoader worker by IterableDataset itself")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be callable, not {transform!r}")
        kw = dict(loader_kwargs)
        _check_args(kw["batch_size"], kw.get("shuffle", "window"), kw.get("seed", 0), kw.get("fields"))
        _check_files(path, kw["keyring"], kw["token"], kw["trust"])
        self._rank, self._world = _rank_world(kw.pop("rank", None), kw.pop("world_size", None),
                                              "shardlock.torch.IterableDataset")
        self._path = os.fspath(path)
        self._kwargs = kw
        self._transform = transform
        self._table = _shared_table(0)
        self._gen = 0
        # The state loaded in this process for the next iteration: (load number, JSON)
        # from the training process, or a worker's own (StatefulDataLoader).
        self._pending: Optional[Tuple[int, str]] = None
        self._own_state: Optional[Dict[str, Any]] = None
        self._loader: Optional[Loader] = None
        self._loader_key: Optional[Tuple[int, int, int]] = None
        self._len: Optional[int] = None
        self._probe_loader: Optional[Tuple[int, Loader]] = None
        self._warned = False
        # Everything a worker would find wrong (the dataset, its fields, a batch larger
        # than the rank) fails here, in the training process, before any worker starts.
        self._probe()

    # Pickling (to spawned DataLoader workers): the shared table travels only while
    # a worker process is being started; the loader never does.
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_loader"] = None
        state["_loader_key"] = None
        state["_probe_loader"] = None
        if multiprocessing.context.get_spawning_popen() is None:
            state["_table"] = None
            state["_epoch_for_copy"] = self._next_epoch(0)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        epoch = state.pop("_epoch_for_copy", 0)
        self.__dict__.update(state)
        if self._table is None:
            self._table = _shared_table(epoch)

    def _next_epoch(self, worker: int) -> int:
        return int(self._table[_NEXT + worker])

    @property
    def epoch(self) -> int:
        """The epoch the next pass reads (in the training process)."""
        return self._next_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next pass, in every worker (like ``DistributedSampler.set_epoch``).
        Passes advance it by themselves; call this to choose."""
        e = int(epoch)
        if e < 0:
            raise ValueError(f"epoch must be at least 0, got {e}")
        for w in range(MAX_WORKERS):
            self._table[_NEXT + w] = e
        self._pending = None
        self._own_state = None

    def _make_loader(self, worker: int, workers: int) -> Loader:
        key = (os.getpid(), worker, workers)
        if self._loader is None or self._loader_key != key:
            self._loader = None
            self._loader = Loader(
                self._path, rank=self._rank, world_size=self._world,
                dataloader_worker=None if workers == 1 else (worker, workers), **self._kwargs,
            )
            self._loader_key = key
        return self._loader

    def __iter__(self) -> Iterator[Any]:
        if _auto_collating() and not self._warned:
            self._warned = True
            warnings.warn(
                "a DataLoader with a batch_size is batching shardlock batches (each would gain a leading dimension "
                "of 1): pass batch_size=None to the DataLoader, or use shardlock.torch.DataLoader",
                UserWarning, stacklevel=2,
            )
        info = torch.utils.data.get_worker_info()
        try:
            return self._batches(self._start_pass(info), info is not None)
        except Exception as e:
            # Raised at the first next(): a persistent worker re-creates its iterator
            # outside the DataLoader's error handling, where a raise kills the worker.
            return self._raising(e, info is not None)

    def _raising(self, e: Exception, in_worker: bool) -> Iterator[Any]:
        if in_worker and isinstance(e, ShardlockError):
            raise _carrying_attributes(e) from None
        raise e
        yield  # makes this a generator

    def _set_slots(self, base: int, worker: int, workers: int, value: int) -> None:
        """Writes ``value`` into this worker's slot and into every slot past the
        current worker count, so a later pass with more workers (or none) agrees."""
        self._table[base + worker] = value
        for w in range(workers, MAX_WORKERS):
            self._table[base + w] = value

    def _start_pass(self, info: Any) -> Loader:
        """This process's loader, at the epoch (or loaded state) of its next pass."""
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers > MAX_WORKERS:
            raise ValueError(f"shardlock.torch.IterableDataset serves at most {MAX_WORKERS} DataLoader workers, "
                             f"got num_workers={workers}")
        if int(self._table[_GEN]) != self._gen:
            raise ShardlockError(
                "load_state_dict() was called after these persistent DataLoader workers started, so they cannot see "
                "the state: load it before the DataLoader's first pass, or create the DataLoader again"
            )
        loader = self._make_loader(worker, workers)
        epoch = self._next_epoch(worker)
        if self._own_state is not None:
            loader.load_state_dict(self._own_state)
            epoch = loader.epoch
            self._own_state = None
        elif self._pending is not None and int(self._table[_APPLIED + worker]) != self._pending[0]:
            loader.load_state_dict(json.loads(self._pending[1]))
            self._set_slots(_APPLIED, worker, workers, self._pending[0])
            epoch = loader.epoch
        else:
            loader.set_epoch(epoch)
        self._set_slots(_NEXT, worker, workers, epoch + 1)
        return loader

    def _batches(self, loader: Loader, in_worker: bool) -> Iterator[Any]:
        try:
            for batch in loader:
                yield batch if self._transform is None else self._transform(batch)
        except ShardlockError as e:
            if not in_worker:
                raise
            raise _carrying_attributes(e) from None

    def _probe(self) -> Loader:
        """A loader for the whole rank in this process, for counting (never iterated)."""
        if self._probe_loader is None or self._probe_loader[0] != os.getpid():
            # On the CPU: CUDA must not be initialised before DataLoader workers fork.
            kw = dict(self._kwargs, device="cpu")
            self._probe_loader = (os.getpid(), Loader(self._path, rank=self._rank, world_size=self._world, **kw))
        return self._probe_loader[1]

    def _rank_samples(self, epoch: int, consumed: list) -> int:
        """Samples left in the rank's ``epoch`` after ``consumed``."""
        probe = self._probe()
        probe.load_state_dict({"epoch": epoch, "seed": int(self._kwargs.get("seed", 0)), "consumed": consumed})
        return int(probe._native.sample_counts()[0])

    def __len__(self) -> int:
        """Batches one epoch yields for this rank (all workers together)."""
        if self._len is None:
            probe = self._probe()
            probe.set_epoch(0)
            self._len = len(probe)
        return self._len

    def state_dict(self) -> Dict[str, Any]:
        """In the process that iterates (no workers, or inside a worker for
        ``StatefulDataLoader``): that loader's resume state. In the training process
        with workers: the epoch the next pass reads (:meth:`DataLoader.state_dict`
        has the position within the epoch)."""
        if self._loader is not None and self._loader_key is not None and self._loader_key[0] == os.getpid():
            return self._loader.state_dict()
        return {"epoch": self._next_epoch(0), "seed": int(self._kwargs.get("seed", 0)), "consumed": []}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The next pass continues from ``state``: in the training process, in every
        worker (each reads its share of what is left); inside a worker
        (``StatefulDataLoader``), in that worker."""
        state = dict(state)
        if "epoch" not in state:
            raise ValueError(f"not a shardlock state (no 'epoch'): {sorted(state)}")
        if torch.utils.data.get_worker_info() is not None:
            self._own_state = state
            return
        self._gen += 1
        self._table[_GEN] = self._gen
        self._pending = (self._gen, json.dumps(state))
        self._own_state = None
        for w in range(MAX_WORKERS):
            self._table[_NEXT + w] = int(state["epoch"])


class _CountingIter:
    """The DataLoader's iterator, counting the batches it delivers."""

    def __init__(self, owner: "DataLoader", it: Iterator[Any]) -> None:
        self._owner, self._it = owner, it

    def __iter__(self) -> "_CountingIter":
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            self._owner._pass_ended(self)
            raise
        self._owner._delivered(self)
        return batch

    def __len__(self) -> int:
        return len(self._it)  # type: ignore[arg-type]


class DataLoader(torch.utils.data.DataLoader):  # type: ignore[type-arg]
    """``torch.utils.data.DataLoader`` set up for an :class:`IterableDataset`:
    ``batch_size=None`` (the dataset batches), ``persistent_workers=True`` when there
    are workers (each keeps its loader and its open shards between epochs),
    ``pin_memory`` when CUDA is available, and a :meth:`state_dict` of what was
    delivered that restores with any ``num_workers``. Other keyword arguments go to
    the DataLoader; ``batch_size``, ``shuffle``, ``sampler``, ``batch_sampler`` and
    ``drop_last`` belong to the dataset and are refused here."""

    def __init__(self, dataset: IterableDataset, num_workers: int = 0, **kwargs: Any) -> None:
        if not isinstance(dataset, IterableDataset):
            raise TypeError(f"shardlock.torch.DataLoader takes a shardlock.torch.IterableDataset, not "
                            f"{type(dataset).__name__}")
        for k in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if k in kwargs and not (k == "batch_size" and kwargs[k] is None):
                raise ValueError(f"{k}= is the dataset's: pass it to shardlock.torch.IterableDataset, not the DataLoader")
        if kwargs.get("in_order", True) is False:
            raise ValueError("in_order=False: shardlock.torch.DataLoader's state counts batches delivered in order")
        kwargs.pop("batch_size", None)
        kwargs.setdefault("persistent_workers", num_workers > 0)
        kwargs.setdefault("pin_memory", torch.cuda.is_available())
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        self._current: Optional[_CountingIter] = None
        self._epoch = 0
        self._history: list = []
        self._count = 0
        self._resumed: Optional[Dict[str, Any]] = None

    def __iter__(self) -> _CountingIter:  # type: ignore[override]
        ds: IterableDataset = self.dataset  # type: ignore[assignment]
        if self._resumed is not None:
            self._epoch = int(self._resumed["epoch"])
            self._history = list(self._resumed.get("consumed", []))
            self._resumed = None
        else:
            self._epoch, self._history = ds.epoch, []
        self._count = 0
        it = _CountingIter(self, super().__iter__())
        self._current = it
        return it

    def _delivered(self, it: _CountingIter) -> None:
        if it is self._current:
            self._count += 1

    def _pass_ended(self, it: _CountingIter) -> None:
        if it is self._current:
            self._current = None
            self._epoch, self._history, self._count = self._epoch + 1, [], 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (the dataset's :meth:`IterableDataset.set_epoch`;
        Hugging Face's ``Trainer`` calls it each epoch)."""
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]

    def state_dict(self) -> Dict[str, Any]:
        """The rank's resume state after the batches delivered so far (prefetched
        batches not yet delivered are read again): restore it with
        :meth:`load_state_dict` in a new process, with any ``num_workers``."""
        ds: IterableDataset = self.dataset  # type: ignore[assignment]
        consumed = list(self._history)
        if self._current is not None and self._count > 0:
            per_rank = self._count * int(ds._kwargs["batch_size"])
            if not ds._kwargs.get("drop_last", True):  # the last batch may be partial
                per_rank = min(per_rank, ds._rank_samples(self._epoch, list(self._history)))
            consumed.append({"world": ds._world, "per_rank": per_rank})
        if self._current is None and self._resumed is not None:
            return dict(self._resumed)
        if self._current is None:
            return {"epoch": ds.epoch, "seed": int(ds._kwargs.get("seed", 0)), "consumed": []}
        return {"epoch": self._epoch, "seed": int(ds._kwargs.get("seed", 0)), "consumed": consumed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The next pass continues from ``state`` (from :meth:`state_dict`)."""
        ds: IterableDataset = self.dataset  # type: ignore[assignment]
        if "worker" in state:
            raise ValueError("this is one DataLoader worker's state; DataLoader.load_state_dict takes the rank's state "
                             "from DataLoader.state_dict()")
        ds.load_state_dict(state)
        self._resumed = dict(state)
