"""PyTorch integration: :class:`IterableDataset` for ``torch.utils.data.DataLoader``.

Use it with ``batch_size=None`` (shardlock already batches)::

    ds = shardlock.torch.IterableDataset("data/", keyring=..., token=..., trust=..., batch_size=256)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)

Each DataLoader worker builds its own :class:`shardlock.Loader` inside the worker
process (never across a fork) and reads a disjoint share of the epoch: worker ``w`` of
``n`` on rank ``r`` of ``W`` is rank ``r * n + w`` of ``W * n``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional

import torch.utils.data

from shardlock.loader import Loader, _rank_world


class IterableDataset(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """A :class:`shardlock.Loader` as a PyTorch ``IterableDataset``. Implements
    ``state_dict``/``load_state_dict`` for torchdata's ``StatefulDataLoader``."""

    def __init__(self, path: "str | os.PathLike[str]", **loader_kwargs: Any) -> None:
        super().__init__()
        self._path = os.fspath(path)
        self._kwargs = loader_kwargs
        self._epoch = 0
        self._state: Optional[Dict[str, Any]] = None
        self._loader: Optional[Loader] = None

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next iteration."""
        self._epoch = int(epoch)

    def _make_loader(self) -> Loader:
        kw = dict(self._kwargs)
        rank, world = _rank_world(kw.pop("rank", None), kw.pop("world_size", None), "shardlock.torch.IterableDataset")
        info = torch.utils.data.get_worker_info()
        if info is not None:
            rank, world = rank * info.num_workers + info.id, world * info.num_workers
        return Loader(self._path, rank=rank, world_size=world, **kw)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        loader = self._make_loader()
        loader.set_epoch(self._epoch)
        if self._state is not None:
            loader.load_state_dict(self._state)
            self._state = None
        self._loader = loader
        yield from loader
        self._epoch += 1

    def state_dict(self) -> Dict[str, Any]:
        """The current loader's resume state (in the process that iterates)."""
        if self._loader is not None:
            return self._loader.state_dict()
        return dict(self._state or {"epoch": self._epoch})

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from ``state`` at the next iteration."""
        self._state = dict(state) if "consumed" in state else None
        self._epoch = int(state.get("epoch", self._epoch))
