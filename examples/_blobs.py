"""Shared set-up of the training examples: keys, a packed synthetic dataset, a token.

Two Gaussian blobs in 32 dimensions (``x`` f32[32], label ``y`` i64), packed into
encrypted shards of 1 MiB under a fresh keyring and issuer key, and a 10-minute token
for the job.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any, Dict

import numpy as np

import shardlock

DATASET_ID = "examples/blobs"


def example_args(epochs: int) -> argparse.Namespace:
    """``--samples`` (default 20,000) and ``--epochs`` of a training example."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=epochs)
    return ap.parse_args()


def make_blobs(root: pathlib.Path, samples: int, principal: str) -> Dict[str, Any]:
    """Packs the dataset under ``root`` and returns the loader's keyword arguments
    (``keyring``, ``token``, ``trust``) plus ``path``."""
    keyring, issuer = root / "keyring.json", root / "issuer.key"
    shardlock.create_keyring(keyring)
    trust = shardlock.create_issuer_key(issuer)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=samples)
    x = (rng.standard_normal((samples, 32)) + (2 * y[:, None] - 1) * 0.6).astype(np.float32)
    shardlock.pack_numpy(root / "data", {"x": x, "y": y.astype(np.int64)}, keyring=keyring, issuer_key=issuer,
                         dataset_id=DATASET_ID, shard_size=1 << 20)
    token = root / "job.token"
    shardlock.issue_token(issuer, token, dataset_id=DATASET_ID, principal=principal, ttl="10m")
    return {"path": root / "data", "keyring": keyring, "token": token, "trust": trust}


def blobs_kwargs(root: pathlib.Path) -> Dict[str, Any]:
    """The same keyword arguments for a dataset :func:`make_blobs` packed earlier."""
    return {"path": root / "data", "keyring": root / "keyring.json", "token": root / "job.token",
            "trust": root / "issuer.key.pub"}


class EpochCheck:
    """Collects the sample ids of each epoch and fails loudly when an epoch repeats a
    sample, misses one, or repeats the previous epoch's order."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.epochs: list = []
        self.current: list = []

    def add(self, ids: Any) -> None:
        self.current.extend(int(i) for i in ids)

    def end_epoch(self) -> str:
        ids, self.current = self.current, []
        if len(set(ids)) != len(ids):
            raise SystemExit(f"epoch {len(self.epochs)} delivered {len(ids) - len(set(ids))} samples twice")
        if len(ids) != self.expected:
            raise SystemExit(f"epoch {len(self.epochs)} delivered {len(ids)} samples, expected {self.expected}")
        if self.epochs and ids == self.epochs[-1]:
            raise SystemExit(f"epoch {len(self.epochs)} repeated the previous epoch's order")
        self.epochs.append(ids)
        return f"{len(ids)} distinct samples"
