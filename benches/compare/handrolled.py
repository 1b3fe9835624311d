"""The baseline a user would write by hand: the plaintext cut into 16 KiB chunks, each
sealed with AES-256-GCM (`cryptography`, i.e. OpenSSL) under nonce = chunk index, and a
map-style torch Dataset whose __getitem__ decrypts the chunks covering one sample.
(No header, no key commitment, no access control: the cheapest honest design.)"""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CHUNK = 16 << 10
TAG = 16


def _nonce(k: int) -> bytes:
    return k.to_bytes(12, "big")


def write(plain: np.ndarray, out_dir: str) -> int:
    """Encrypts `plain` (samples x ...) into out_dir/chunks.bin; returns bytes in."""
    os.makedirs(out_dir, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    with open(os.path.join(out_dir, "key.bin"), "wb") as f:
        f.write(key)
    aead, flat = AESGCM(key), memoryview(np.ascontiguousarray(plain).reshape(-1))
    with open(os.path.join(out_dir, "chunks.bin"), "wb") as f:
        for k, off in enumerate(range(0, len(flat), CHUNK)):
            f.write(aead.encrypt(_nonce(k), flat[off : off + CHUNK], None))
    return len(flat)


class Dataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Sample i = plaintext bytes [i*S, (i+1)*S), decrypted chunk by chunk on access."""

    def __init__(self, out_dir: str, count: int, dims: tuple) -> None:
        with open(os.path.join(out_dir, "key.bin"), "rb") as f:
            self._aead = AESGCM(f.read())
        self._file = open(os.path.join(out_dir, "chunks.bin"), "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._count, self._dims = count, dims
        self._size = int(np.prod(dims))

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> torch.Tensor:
        lo, hi = i * self._size, (i + 1) * self._size
        first, last = lo // CHUNK, (hi - 1) // CHUNK
        parts = []
        for k in range(first, last + 1):
            at = k * (CHUNK + TAG)
            parts.append(self._aead.decrypt(_nonce(k), self._map[at : at + CHUNK + TAG], None))
        buf = b"".join(parts)
        skip = lo - first * CHUNK
        return torch.frombuffer(bytearray(memoryview(buf)[skip : skip + self._size]), dtype=torch.uint8).view(self._dims)
