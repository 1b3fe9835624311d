"""What every part of the comparison agrees on: the two data shapes, how a sample is
made (its first 8 bytes are its index, the rest random), and the spot-check that a
batch a loader yielded is the plaintext it should be."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List

import numpy as np


@dataclasses.dataclass(frozen=True)
class Shape:
    """One of the two datasets: `count` uint8 samples of `dims`, read in `batch`es."""

    name: str
    dims: tuple
    count: int
    batch: int

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.dims))

    @property
    def total_bytes(self) -> int:
        return self.sample_bytes * self.count


def shapes(small: bool) -> Dict[str, Shape]:
    """tokens: 8 KiB samples x 200k (batch 256); images: 3x224x224 x 10k (batch 64);
    ~1.5 GiB each. The smoke run keeps the sample sizes and batches, ~30 MB each."""
    return {
        "tokens": Shape("tokens", (8192,), 4_000 if small else 200_000, 256),
        "images": Shape("images", (3, 224, 224), 200 if small else 10_000, 64),
    }


def plaintext_path(data: str, shape: Shape) -> str:
    """The plaintext .npy (field name `x`, the file stem shardlock's CLI packs as)."""
    return os.path.join(data, shape.name, "plain", "x.npy")


def write_plaintext(path: str, shape: Shape, seed: int = 0) -> None:
    """Random samples whose first 8 bytes hold their index (little-endian uint64), so
    that any yielded row says which sample it claims to be."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(shape.count, *shape.dims))
    flat = arr.reshape(shape.count, shape.sample_bytes)
    rng = np.random.default_rng(seed)
    step = max(1, (64 << 20) // shape.sample_bytes)
    for lo in range(0, shape.count, step):
        hi = min(shape.count, lo + step)
        block = np.frombuffer(rng.bytes((hi - lo) * shape.sample_bytes), dtype=np.uint8).reshape(hi - lo, -1).copy()
        block[:, :8] = np.arange(lo, hi, dtype="<u8").view(np.uint8).reshape(hi - lo, 8)
        flat[lo:hi] = block
    arr.flush()
    del arr


_rows: Dict[str, np.ndarray] = {}


def sample_dict(path: str, i: int) -> Dict[str, np.ndarray]:
    """Sample `i` of the plaintext .npy as {"x": array}: the item that litdata's
    optimize() and MDSWriter take. Module-level, so worker processes can unpickle it."""
    if path not in _rows:
        _rows[path] = np.load(path, mmap_mode="r")
    return {"x": np.asarray(_rows[path][i])}


class SpotCheck:
    """Checks the batches of one epoch against the plaintext: every row's index is in
    range and seen once, and a few rows of every `every`-th batch equal the plaintext
    byte for byte. Costs a few microseconds per batch, the same for every loader."""

    def __init__(self, plain: np.ndarray, every: int = 16, rows: int = 4) -> None:
        self._plain = plain.reshape(plain.shape[0], -1)
        self._every, self._rows = every, rows
        self.seen: List[np.ndarray] = []
        self.batches = 0
        self.compared = 0
        self.errors: List[str] = []

    def batch(self, x: np.ndarray) -> None:
        flat = x.reshape(x.shape[0], -1)
        ids = np.ascontiguousarray(flat[:, :8]).view("<u8").ravel()
        self.seen.append(ids)
        if self.batches % self._every == 0:
            for r in np.linspace(0, len(ids) - 1, min(self._rows, len(ids))).astype(int):
                i = int(ids[r])
                self.compared += 1
                if i >= len(self._plain) or not np.array_equal(flat[r], self._plain[i]):
                    self.errors.append(f"batch {self.batches} row {r}: not sample {i} of the plaintext")
        self.batches += 1

    def finish(self, expected: int) -> Dict[str, object]:
        """Summary of the epoch; `expected` is how many samples it should yield."""
        ids = np.concatenate(self.seen) if self.seen else np.zeros(0, dtype="<u8")
        if len(ids) != expected:
            self.errors.append(f"yielded {len(ids)} samples, expected {expected}")
        if len(np.unique(ids)) != len(ids):
            self.errors.append(f"{len(ids) - len(np.unique(ids))} duplicate samples")
        if len(ids) and int(ids.max()) >= len(self._plain):
            self.errors.append(f"sample index {int(ids.max())} out of range")
        head = ids[: min(len(ids), 64)]
        return {
            "samples": int(len(ids)),
            "compared_rows": self.compared,
            "shuffled": bool(len(head) > 1 and not np.array_equal(head, np.sort(head))),
            "first_ids": [int(i) for i in head[:8]],
            "errors": self.errors[:5],
        }
