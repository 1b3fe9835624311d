"""Access tokens from Python: :func:`issue_token`, :func:`attenuate_token`,
:func:`revoke_token`, with the CLI's duration strings (or seconds, or a ``timedelta``)
and one name for the dataset id (``dataset_id``, as in :class:`shardlock.Writer`)."""

from __future__ import annotations

import datetime
import os
from typing import Optional, Union

from shardlock import _lib
from shardlock.loader import _duration_arg, _int_arg

PathLike = Union[str, "os.PathLike[str]"]
Duration = Union[str, int, datetime.timedelta]


def issue_token(
    issuer_key: PathLike,
    out: PathLike,
    *,
    dataset_id: Optional[str] = None,
    principal: str,
    shards: str = "all",
    ops: str = "read",
    ttl: Duration = "1h",
    not_before: Optional[str] = None,
    min_generation: Optional[int] = None,
    dataset: Optional[str] = None,
) -> str:
    """Issues a token for ``dataset_id`` (``dataset=`` is the older spelling) to
    ``principal``: the shards (``"all"``, ``"0-9,12"``), operations (``"read"``,
    ``"read,verify"``), lifetime ``ttl`` (``"8h"``, seconds, a ``timedelta``; more
    than zero), optional ``not_before`` (RFC 3339 or Unix seconds) and
    ``min_generation``. Writes it to ``out`` (mode 0600) and returns its
    revocation id (for :func:`revoke_token`)."""
    if dataset is not None and dataset_id is not None and dataset != dataset_id:
        raise ValueError(f"dataset_id={dataset_id!r} and dataset={dataset!r} disagree: pass one")
    ds = dataset_id if dataset_id is not None else dataset
    if ds is None:
        raise TypeError("issue_token() missing required keyword argument: 'dataset_id'")
    return _lib.issue_token(
        issuer_key, out, dataset=ds, principal=principal, shards=shards, ops=ops, ttl=_duration_arg("ttl", ttl),
        not_before=not_before, min_generation=None if min_generation is None else _int_arg("min_generation",
                                                                                           min_generation, 1),
    )


def attenuate_token(
    token: PathLike,
    trust: PathLike,
    out: PathLike,
    *,
    shards: Optional[str] = None,
    ops: Optional[str] = None,
    ttl: Optional[Duration] = None,
    min_generation: Optional[int] = None,
) -> str:
    """Narrows ``token`` offline (no issuer key needed): fewer shards or operations, a
    shorter ``ttl`` (``"1h"``, seconds, a ``timedelta``), a higher
    ``min_generation``. Writes the narrower token to ``out`` and returns
    its revocation id."""
    return _lib.attenuate_token(
        token, trust, out, shards=shards, ops=ops, ttl=None if ttl is None else _duration_arg("ttl", ttl),
        min_generation=None if min_generation is None else _int_arg("min_generation", min_generation, 1),
    )


revoke_token = _lib.revoke_token
