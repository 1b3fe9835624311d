"""Shared fixtures: keys, a token, small datasets."""

import os
import pathlib

import numpy as np
import pytest

import shardlock


class Env:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.keyring = root / "keyring.json"
        self.issuer = root / "issuer.key"
        shardlock.create_keyring(self.keyring)
        self.trust = pathlib.Path(shardlock.create_issuer_key(self.issuer))

    def token(self, dataset: str, name: str = "job.token", **kw) -> pathlib.Path:
        p = self.root / name
        kw.setdefault("principal", "pytest")
        shardlock.issue_token(self.issuer, p, dataset=dataset, **kw)
        return p

    def pack(self, name: str, arrays, dataset: str = None, shard_size: int = 1 << 16) -> pathlib.Path:
        out = self.root / name
        shardlock.pack_numpy(out, arrays, keyring=self.keyring, issuer_key=self.issuer, dataset_id=dataset or name, shard_size=shard_size)
        return out

    def loader(self, path, dataset=None, **kw):
        kw.setdefault("batch_size", 8)
        token = kw.pop("token", None) or self.token(dataset or path.name)
        return shardlock.Loader(path, keyring=self.keyring, token=token, trust=self.trust, **kw)


@pytest.fixture
def env(tmp_path: pathlib.Path) -> Env:
    return Env(tmp_path)


@pytest.fixture
def numbers(env: Env):
    """1000 samples: x = f32[4] (i, i+0.5, -i, 7), y = i64 i, over several shards."""
    n = 1000
    i = np.arange(n)
    x = np.stack([i, i + 0.5, -i, np.full(n, 7)], axis=1).astype(np.float32)
    path = env.pack("numbers", {"x": x, "y": i.astype(np.int64)}, shard_size=4096)
    return path, x, i
