"""shardlock: an encrypted streaming data loader for GPU training.

Data owners pack datasets into encrypted shards (:class:`Writer`, :func:`pack_numpy`);
training jobs stream them with :class:`Loader`, which authorizes a signed access token
for every shard before its key is unwrapped, authenticates every 16 KiB chunk, and
yields batches as torch tensors (or NumPy arrays) that share the page-locked batch
buffer without copying.

    >>> import shardlock
    >>> loader = shardlock.Loader("dataset/", keyring="keyring.json",
    ...                           token="job.token", trust="issuer.key.pub",
    ...                           batch_size=256)
    >>> for batch in loader:
    ...     x = batch["image"]          # torch.Tensor, shape [256, 3, 224, 224]

``keyring=`` is a keyring file or the RFC 7512 URI of a KEK held in a PKCS#11 HSM,
e.g. ``"pkcs11:token=shardlock;object=kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:HSM_PIN"``
(create one with :func:`create_hsm_kek`; see docs/HSM.md). ``device="cuda:N"`` yields
CUDA tensors copied from the locked buffers on a dedicated stream (docs/CUDA.md).

``shardlock.torch`` (imported on first use) has the PyTorch ``IterableDataset`` and
``DataLoader``; README "PyTorch, Lightning, Hugging Face" has the rules.

The path may be ``"s3://bucket/prefix"``: shards are then fetched ahead of the epoch
into a local cache that holds ciphertext only (``storage_options=`` of :class:`Loader`
sets endpoint, region, credentials, ``cache_dir``, ``cache_bytes``; see docs/S3.md).
"""

from shardlock._lib import (
    AccessDenied,
    AuditError,
    DecodeError,
    DeviceError,
    DeviceUnavailable,
    FormatError,
    IntegrityError,
    InvalidToken,
    KeyUnavailable,
    MemoryLockError,
    OutOfScope,
    RemoteError,
    ShardlockError,
    TokenExpired,
    TokenRevoked,
    __version__,
    create_hsm_kek,
    create_issuer_key,
    create_keyring,
)
from shardlock.image import IMAGENET_MEAN, IMAGENET_STD, Image
from shardlock.ingest import image_folder_classes, pack
from shardlock.loader import Loader, TokenWindows
from shardlock.mix import Mix
from shardlock.tokens import attenuate_token, issue_token, revoke_token
from shardlock.writer import Writer, assemble, pack_numpy


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """``shardlock.torch`` on first use, so ``import shardlock`` does not import torch."""
    if name == "torch":
        import importlib

        return importlib.import_module("shardlock.torch")
    raise AttributeError(f"module 'shardlock' has no attribute {name!r}")


__all__ = [
    "AccessDenied",
    "AuditError",
    "DecodeError",
    "DeviceError",
    "DeviceUnavailable",
    "FormatError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Image",
    "IntegrityError",
    "InvalidToken",
    "KeyUnavailable",
    "Loader",
    "MemoryLockError",
    "Mix",
    "OutOfScope",
    "RemoteError",
    "ShardlockError",
    "TokenExpired",
    "TokenRevoked",
    "TokenWindows",
    "Writer",
    "__version__",
    "assemble",
    "attenuate_token",
    "create_hsm_kek",
    "create_issuer_key",
    "create_keyring",
    "image_folder_classes",
    "issue_token",
    "pack",
    "pack_numpy",
    "revoke_token",
]
