"""Reads one shape's dataset through one loader for two epochs, shuffle on:

    python benches/compare/peers.py LOADER SHAPE DATA_DIR [--workers N] [--small]

Prints one JSON line: per epoch the seconds, bytes and samples of the batches yielded,
time to first batch, CPU seconds of this process and its reaped workers, and the spot
check of every batch against the plaintext. Run by run.py, one process per loader, so
that its memory and CPU time are its own."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Shape, SpotCheck, plaintext_path, shapes  # noqa: E402
from prepare import FERNET_PASSWORD  # noqa: E402

Batches = Callable[[], Iterable[Any]]


class Memmap(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """What most users run today: a map-style Dataset over a numpy memmap (plaintext)."""

    def __init__(self, path: str) -> None:
        self._arr = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self._arr)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._arr[i]))


def shardlock_loader(shape: Shape, data: str, shuffle: str) -> Batches:
    import shardlock

    d = os.path.join(data, shape.name, "shardlock")
    loader = shardlock.Loader(os.path.join(d, "ds"), keyring=os.path.join(d, "keyring.json"),
                              token=os.path.join(d, "job.token"), trust=os.path.join(d, "issuer.key.pub"),
                              batch_size=shape.batch, shuffle=shuffle, seed=0)
    return lambda: loader  # one pass = one epoch; the next pass reads the next


def torch_loader(dataset: torch.utils.data.Dataset, shape: Shape, workers: int) -> Batches:  # type: ignore[type-arg]
    # An IterableDataset (Mosaic's) shuffles itself; DataLoader refuses shuffle= for it.
    shuffle = not isinstance(dataset, torch.utils.data.IterableDataset)
    dl = torch.utils.data.DataLoader(dataset, batch_size=shape.batch, shuffle=shuffle, num_workers=workers)
    return lambda: dl


def litdata_loader(shape: Shape, data: str, workers: int, encrypted: bool) -> Batches:
    from litdata import StreamingDataLoader, StreamingDataset

    kwargs = {}
    if encrypted:
        from litdata.utilities.encryption import FernetEncryption

        kwargs["encryption"] = FernetEncryption.load(os.path.join(data, shape.name, "fernet.pem"), FERNET_PASSWORD)
    d = os.path.join(data, shape.name, "litdata-fernet" if encrypted else "litdata")
    ds = StreamingDataset(input_dir=d, shuffle=True, **kwargs)  # a plain path: read in place, no cache copy
    dl = StreamingDataLoader(ds, batch_size=shape.batch, num_workers=workers)
    return lambda: dl


def handrolled_loader(shape: Shape, data: str, workers: int) -> Batches:
    import handrolled

    ds = handrolled.Dataset(os.path.join(data, shape.name, "handrolled"), shape.count, shape.dims)
    return torch_loader(ds, shape, workers)


def mds_loader(shape: Shape, data: str, workers: int) -> Batches:
    import streaming

    streaming.base.util.clean_stale_shared_memory()
    ds = streaming.StreamingDataset(local=os.path.join(data, shape.name, "mds"), shuffle=True, batch_size=shape.batch)
    return torch_loader(ds, shape, workers)


def build(name: str, shape: Shape, data: str, workers: int) -> Batches:
    if name.startswith("shardlock-"):
        return shardlock_loader(shape, data, name.split("-", 1)[1])
    if name == "torch-memmap":
        return torch_loader(Memmap(plaintext_path(data, shape)), shape, workers)
    if name in ("litdata", "litdata-fernet"):
        return litdata_loader(shape, data, workers, name == "litdata-fernet")
    if name == "handrolled":
        return handrolled_loader(shape, data, workers)
    if name == "mds":
        return mds_loader(shape, data, workers)
    raise SystemExit(f"unknown loader {name}")


def expected_samples(name: str, shape: Shape) -> int:
    """shardlock drops the last partial batch by default; the others yield every sample."""
    return shape.count // shape.batch * shape.batch if name.startswith("shardlock-") else shape.count


def cpu_seconds() -> float:
    """This process and its reaped children (DataLoader workers end with each epoch)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("loader")
    ap.add_argument("shape")
    ap.add_argument("data")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    shape = shapes(a.small)[a.shape]
    plain = np.load(plaintext_path(a.data, shape), mmap_mode="r")
    t_build = time.perf_counter()
    batches = build(a.loader, shape, a.data, a.workers)
    epochs = []
    for epoch in range(a.epochs):
        # About 50 batches per epoch are compared row by row, whatever the size.
        check, nbytes, first = SpotCheck(plain, every=max(1, shape.count // shape.batch // 50)), 0, None
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        for b in batches():
            x = b["x"] if isinstance(b, dict) else b
            if first is None:
                first = time.perf_counter() - (t_build if epoch == 0 else t0)
            nbytes += x.numel() * x.element_size()
            check.batch(x.numpy())
        secs = time.perf_counter() - t0
        summary = check.finish(expected_samples(a.loader, shape))
        epochs.append({"seconds": secs, "bytes": nbytes, "gb_per_s": nbytes / secs / 1e9,
                       "samples_per_s": summary["samples"] / secs, "first_batch_s": first,
                       "cpu_s": cpu_seconds() - cpu0, **summary})
    print(json.dumps({"loader": a.loader, "shape": a.shape, "workers": a.workers, "epochs": epochs}))


if __name__ == "__main__":
    main()
