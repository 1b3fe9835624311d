"""Streaming batches: :class:`Loader`."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import operator
import os
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:
    import datetime

from shardlock._lib import NativeLoader, ShardlockError
from shardlock.image import Image

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger("shardlock")

SHUFFLES = ("none", "window", "global")


def _dist_rank_world() -> Tuple[int, int, str]:
    """(rank, world size, where they came from) when none were given: an initialised
    ``torch.distributed`` process group, else the ``RANK``/``WORLD_SIZE`` environment
    variables that torchrun (and most launchers) set, else 0 of 1."""
    try:
        import torch.distributed as dist
    except Exception:  # torch missing or built without distributed
        dist = None  # type: ignore[assignment]
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), "torch.distributed"
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is not None and world is not None:
        try:
            r, w = int(rank), int(world)
        except ValueError:
            raise ValueError(f"RANK={rank!r} / WORLD_SIZE={world!r} in the environment are not integers") from None
        if not (w >= 1 and 0 <= r < w):
            raise ValueError(f"RANK={r} / WORLD_SIZE={w} in the environment: need 0 <= RANK < WORLD_SIZE")
        return r, w, "the RANK/WORLD_SIZE environment variables"
    if rank is not None or world is not None:
        logger.warning(
            "only one of RANK (%r) and WORLD_SIZE (%r) is set in the environment: ignoring it, reading as rank 0 of 1",
            rank, world,
        )
    return 0, 1, "the default (no torch.distributed process group, no RANK/WORLD_SIZE in the environment)"


def _rank_world(rank: Optional[int], world_size: Optional[int], what: str = "Loader") -> Tuple[int, int]:
    """The rank and world size to read as: the ones given, else :func:`_dist_rank_world`.
    Logs (logger ``shardlock``, INFO) which source was used."""
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is not None:
        assert world_size is not None
        r, w = _check_rank_world(rank, world_size)
        source = "the rank=/world_size= arguments"
    else:
        r, w, source = _dist_rank_world()
    logger.info("%s reads as rank %d of %d (from %s)", what, r, w, source)
    return r, w


def _int_arg(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int of at least ``minimum`` (bool and float refused)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, not {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {v}")
    return v


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def _size_arg(name: str, value: Any) -> int:
    """A byte count given as an int or as the CLI writes it (``"64MiB"``, ``"512k"``,
    ``"1GiB"``; k/M/G are binary, as in the CLI)."""
    if isinstance(value, str):
        text = value.strip()
        digits = len(text) - len(text.lstrip("0123456789"))
        num, unit = text[:digits], text[digits:].strip().lower()
        if not num or unit not in _SIZE_UNITS:
            raise ValueError(f"{name} must be a byte count such as 268435456, '64MiB' or '512k', not {value!r}")
        value = int(num) * _SIZE_UNITS[unit]
    return _int_arg(name, value, 1)


def _duration_arg(name: str, value: Any) -> str:
    """A duration as the native parser takes it: a string as the CLI writes it
    (``"90s"``, ``"30m"``, ``"1h"``, ``"7d"``), whole seconds or a ``timedelta``.
    Zero and negative durations are refused."""
    import datetime

    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
        if value != int(value):
            raise ValueError(f"{name} must be whole seconds, got {value}")
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lstrip("0") in ("", "s", "m", "h", "d") or text.startswith("-"):
            raise ValueError(f"{name} must be a positive duration such as '90s', '30m', '1h' or '7d', not {value!r}")
        return text
    return f"{_int_arg(name, value, 1)}s"


def _is_var(tag: str) -> bool:
    """A variable-length field's tag: ``bytes`` or ``list<dtype>`` (values and offsets)."""
    return tag == "bytes" or tag.startswith("list<")


def _check_strings(strings: Any, fields: List[str], device: str) -> List[str]:
    """``strings=``: names of bytes fields to yield as ``list[str]``."""
    if strings is None:
        return []
    if isinstance(strings, str):
        raise ValueError(f"strings must be a list of field names, not the string {strings!r} (did you mean [{strings!r}]?)")
    names = list(strings)
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise ValueError(f"strings names {unknown[0]!r}, which is not a field of this loader (fields: {', '.join(fields)})")
    if names and device != "cpu":
        raise ValueError("strings= decodes on the CPU: use it with device='cpu'")
    return names


def _decode_strings(name: str, value: Any, ids: Any) -> List[str]:
    """A bytes field's values as ``str``, each decoded as UTF-8."""
    if value[0] != "bytes":
        raise ValueError(f"strings names field {name!r}, which holds {value[0]} tensors, not bytes")
    raw, offsets = value[1].tobytes(), value[2].tolist()
    out = []
    for i in range(len(offsets) - 1):
        try:
            out.append(raw[offsets[i]:offsets[i + 1]].decode("utf-8"))
        except UnicodeDecodeError as e:
            from shardlock._lib import FormatError

            raise FormatError(f"field {name!r} of sample {int(ids[i])} is not UTF-8 ({e.reason} at byte {e.start}); "
                              "read it as bytes (leave it out of strings=)") from None
    return out


def _skew_arg(value: Any) -> str:
    """``clock_skew=``: ``"30s"``/``"2m"``, whole seconds or a ``timedelta``; zero is
    allowed (no tolerance)."""
    import datetime

    if isinstance(value, datetime.timedelta):
        value = int(value.total_seconds())
    if isinstance(value, str):
        return value.strip()
    return f"{_int_arg('clock_skew', value, 0)}s"


def _check_rank_world(rank: Any, world_size: Any) -> Tuple[int, int]:
    r, w = _int_arg("rank", rank, 0), _int_arg("world_size", world_size, 1)
    if r >= w:
        raise ValueError(f"rank must be in 0..world_size-1, got rank={r} with world_size={w}")
    return r, w


def _check_args(batch_size: Any, shuffle: Any, seed: Any, fields: Any) -> Tuple[int, str, int, Optional[List[str]]]:
    """The arguments every loader checks before anything is opened, with a
    ``ValueError`` that names the argument and what it accepts."""
    bs = _int_arg("batch_size", batch_size, 1)
    if not isinstance(shuffle, str) or shuffle not in SHUFFLES:
        raise ValueError(f"shuffle must be one of {', '.join(map(repr, SHUFFLES))}, not {shuffle!r}")
    sd = _int_arg("seed", seed, 0)
    if sd >= 1 << 64:
        raise ValueError(f"seed must be below 2**64, got {sd}")
    if fields is None:
        names = None
    elif isinstance(fields, (str, bytes)):
        raise ValueError(f"fields must be a list of field names, not the string {fields!r} (did you mean [{fields!r}]?)")
    else:
        try:
            names = list(fields)
        except TypeError:
            raise ValueError(f"fields must be a list of field names, not {fields!r}") from None
        bad = [f for f in names if not isinstance(f, str)]
        if bad:
            raise ValueError(f"fields must be a list of field names (str), got {bad[0]!r} in {names!r}")
    return bs, shuffle, sd, names


#: ``keyring=`` values that name a key provider rather than a keyring file.
_KEY_URI_PREFIXES = ("pkcs11:", "https://", "http://", "transit:", "aws-kms:")


def _keyrings(keyring: Any) -> List[str]:
    """``keyring=`` as a list of provider specs: one path or URI, or a list of them (a
    manifest whose shards are wrapped under different custody)."""
    specs = list(keyring) if isinstance(keyring, (list, tuple)) else [keyring]
    if not specs:
        raise ValueError("keyring= needs a keyring file or a key provider URI, or a non-empty list of them")
    return [os.fspath(k) for k in specs]


def _check_files(path: Any, keyring: Any, token: Any, trust: Any) -> None:
    """``FileNotFoundError`` naming the first of the local files a loader reads that
    does not exist, before anything is opened."""
    p = os.fspath(path)
    checks = []
    if "://" not in str(p):
        checks.append(("dataset directory", p))
    for k in _keyrings(keyring):
        if not str(k).startswith(_KEY_URI_PREFIXES):
            checks.append(("keyring file", k))
    if token is not None:
        checks.append(("token file", os.fspath(token)))
    checks.append(("trust (issuer public key) file", os.fspath(trust)))
    for what, f in checks:
        if not os.path.exists(f):
            raise FileNotFoundError(errno.ENOENT, f"{what} not found", str(f))


def _check_worker(worker: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """``dataloader_worker=(id, count)`` checked: 0 <= id < count."""
    if worker is None:
        return 0, 1
    try:
        wid, count = worker
    except (TypeError, ValueError):
        raise ValueError(f"dataloader_worker must be (id, count), not {worker!r}") from None
    wid, count = _int_arg("dataloader_worker id", wid, 0), _int_arg("dataloader_worker count", count, 1)
    if wid >= count:
        raise ValueError(f"dataloader_worker id must be in 0..count-1, got ({wid}, {count})")
    return wid, count


def _storage_options(opts: Optional[Mapping[str, Union[str, int, bool, float, "os.PathLike[str]"]]]) -> Optional[List[Tuple[str, str]]]:
    """Options for ``s3://`` paths as (name, text) pairs; booleans as true/false."""
    if opts is None:
        return None
    out = []
    for k, v in opts.items():
        if isinstance(v, bool):
            out.append((str(k), "true" if v else "false"))
        elif isinstance(v, os.PathLike):
            out.append((str(k), os.fspath(v)))
        else:
            out.append((str(k), str(v)))
    return out


def _decode_arg(decode: Any) -> Optional[List[Tuple[Any, ...]]]:
    """``decode={field: Image(...)}`` as the native loader takes it."""
    if decode is None:
        return None
    if not isinstance(decode, Mapping):
        raise TypeError(f"decode must map field names to shardlock.Image, e.g. {{'image': Image(224)}}; got {type(decode).__name__}")
    out = []
    for name, spec in decode.items():
        if not isinstance(spec, Image):
            raise TypeError(f"decode[{name!r}] must be a shardlock.Image, not {type(spec).__name__}")
        out.append(spec._native(name))
    return out


def _nvjpeg_wheel() -> Optional[str]:
    """libnvjpeg from pip's ``nvidia-nvjpeg-cu12`` / ``-cu13`` wheel or the copy
    torchvision's CUDA wheels ship, if installed (``SHARDLOCK_NVJPEG`` wins; otherwise
    the library path is searched). Only the interpreter's absolute site-packages
    directories are searched: never the working directory or a script's folder, where
    a planted library would be loaded and run."""
    if os.environ.get("SHARDLOCK_NVJPEG"):
        return None
    import glob
    import site

    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    patterns = ("nvidia/nvjpeg/lib/libnvjpeg.so.*", "nvidia/cu13/lib/libnvjpeg.so.*", "torchvision.libs/libnvjpeg*.so*")
    for base in dirs:
        if not base or not os.path.isabs(base):
            continue
        for pattern in patterns:
            hits = sorted(glob.glob(os.path.join(base, pattern)))
            if hits:
                return hits[0]
    return None


def _on_decode_error_arg(v: Any) -> str:
    if v not in ("raise", "skip"):
        raise ValueError(f"on_decode_error must be 'raise' or 'skip', not {v!r}")
    return str(v)


@dataclasses.dataclass(frozen=True)
class TokenWindows:
    """Fixed-length token windows for language-model training, cut from a
    ``list<u16|u32|i32|i64>`` field of documents (``Loader(token_windows=...)``).

    The documents of each epoch (the loader's shuffle, seed and rank split: documents
    are dealt to ranks) are concatenated, each followed by ``eos`` when given, and cut
    into windows of ``seq_len + 1`` tokens (inputs ``w[:-1]``, targets ``w[1:]``) that
    do not overlap, so each token is in one window per epoch. Windows are shuffled in
    blocks of ``shuffle_windows`` consecutive windows (1: in document order) by a
    permutation fixed by (seed, epoch, block), so ``load_state_dict`` resumes exactly,
    even mid-document. The epoch's last ``< seq_len + 1`` tokens are dropped, or padded
    into one more window with ``pad``. Batches hold ``batch_size`` windows (``drop_last``
    drops a short last one): ``batch[field]`` is ``[batch, seq_len + 1]`` int64
    (``widen=False``: the field's dtype), and with ``positions=True``
    ``batch["position_ids"]`` is each token's offset in its document. Documents are
    decrypted ``docs_per_read`` at a time. The windows stay in locked memory until the
    batch is freed; ``len()`` is unknown before the epoch is read (a ``TypeError``).
    """

    field: str
    seq_len: int
    eos: Optional[int] = None
    positions: bool = False
    shuffle_windows: int = 1024
    pad: Optional[int] = None
    widen: bool = True
    docs_per_read: int = 64

    def _native(self) -> Tuple[str, int, Optional[int], bool, int, Optional[int], bool, int]:
        return (str(self.field), _int_arg("seq_len", self.seq_len, 1), None if self.eos is None else int(self.eos),
                bool(self.positions), _int_arg("shuffle_windows", self.shuffle_windows, 1),
                None if self.pad is None else int(self.pad), bool(self.widen),
                _int_arg("docs_per_read", self.docs_per_read, 1))


class Loader:
    """Streams batches of an encrypted dataset.

    Every shard is opened only after the access ``token`` is authorized for it (and
    re-authorized every epoch); its data key is unwrapped from ``keyring`` (a keyring
    file, or a ``pkcs11:`` URI of a KEK in an HSM, which unwraps it inside the token)
    only then. ``keyring="https://host:port"`` names a key service (``shardlock keyd``)
    instead: the process then holds no KEK, and the service checks the token itself
    and releases each shard's key; ``ca_cert`` is the PEM CA that signed the service's
    certificate (default ``$SHARDLOCK_CA_CERT``, ``$SSL_CERT_FILE``, the system bundle),
    ``client_cert``/``client_key`` a client certificate for a service that requires
    mTLS. A list of these (``keyring=["keyring.json", "aws-kms:..."]``) reads a dataset
    whose shards are wrapped under different custody: each shard's key is unwrapped by
    the first that holds its KEK (a key service holds every KEK, so put it last). Then every 16 KiB chunk is authenticated before a byte of it is released.
    Iterating yields ``dict[str, torch.Tensor]`` (``output="numpy"`` for NumPy
    arrays) whose memory is the page-locked batch buffer itself: no copy is made, and
    the buffer is wiped and reused only after every tensor built on it is freed. A
    bytes field yields ``(values: uint8[total], offsets: int64[batch + 1])``, a
    ``list<dtype>`` field (token ids) ``(values: dtype[total], offsets: int64[batch +
    1])`` with offsets counted in elements (sample ``i`` is
    ``values[offsets[i]:offsets[i + 1]]``, the layout of ``torch.nested``'s jagged
    tensors and of Arrow's lists). NumPy
    arrays are read-only; torch has no read-only tensors, so a CPU tensor may be
    written in place, which changes only that batch's buffer (wiped before reuse).

    ``device="cuda:N"`` delivers CUDA tensors instead: each batch is copied
    asynchronously from the locked buffer (registered with the driver, so the copy is
    a DMA) on a dedicated stream while the next batches decrypt; the tensors are
    DLPack views of the device buffer, ordered after the copy on
    ``torch.cuda.current_stream()``, and the buffer is reused only after the work
    queued on that stream when the tensors are freed. ``pinned=False`` copies from
    pageable memory (for confidential-computing GPUs). Without a usable GPU this
    raises :class:`shardlock.DeviceUnavailable`.

    ``clock_skew`` (default 30 s; ``"2m"``, seconds or a ``timedelta``) is the clock
    difference allowed between the token's issuer and this machine for the token's
    expiry and not-before. An expired token raises :class:`shardlock.TokenExpired`
    saying when it expired and what time it is here.

    ``strings=[name, ...]`` yields those bytes fields as ``list[str]`` (UTF-8, as
    :class:`shardlock.Writer` stores a ``str``); a ``bool`` field yields bool tensors.

    ``min_generation`` refuses a dataset whose signed manifest is older than that
    generation (rollback protection: :class:`shardlock.IntegrityError` with
    ``kind="rollback"``).

    One pass over the loader is one epoch; the next pass reads the next epoch (or the
    one given to :meth:`set_epoch`). A new ``iter()`` always starts a pass, like a
    ``torch.utils.data.DataLoader``: if the previous pass did not reach its end (a peek
    such as ``next(iter(loader))``, a ``break``, an error), the new pass reads that same
    epoch again from its beginning, or, for the epoch a :meth:`load_state_dict` state
    was loaded for, from the loaded point. ``len()`` is the number of batches the next
    pass yields (so a peek does not change it), and only the newest iterator yields:
    an older one stops. The epoch advances only when a pass reaches its end.

    ``rank``/``world_size`` default to ``torch.distributed`` when a process group is
    initialised, else to the ``RANK``/``WORLD_SIZE`` environment variables (set by
    torchrun), else 0 / 1; explicit values win. Which source was used is logged to the
    ``shardlock`` logger (INFO). Bad arguments (``batch_size`` not a positive integer,
    ``fields`` a string instead of a list, ``shuffle`` not one of ``"none"``,
    ``"window"``, ``"global"``) raise ``ValueError`` before anything is opened. Errors
    raise subclasses of :class:`shardlock.ShardlockError` naming the dataset, shard,
    chunk or rule.

    ``dataloader_worker=(id, count)`` makes this loader DataLoader worker ``id`` of
    ``count`` on its rank: it yields the rank's batches ``id``, ``id + count``, ...,
    so that a DataLoader taking one batch from each worker in turn delivers the rank's
    epoch in order, and ``drop_last`` drops at most one partial batch per rank.
    :class:`shardlock.torch.IterableDataset` sets it; ``len()`` is then this worker's
    share. Missing ``keyring``, ``token`` or ``trust`` files (and a missing local
    dataset directory) raise ``FileNotFoundError`` naming the path.

    ``decode={"image": shardlock.Image(224, train=True)}`` decodes a bytes field of
    JPEG, PNG or WebP images on the decrypt workers, straight into the locked batch, as
    a ``uint8[batch, 3, 224, 224]`` tensor (or the :class:`shardlock.Image`'s dtype and
    layout), with torchvision's train or eval transforms (docs/DECODE.md). A sample
    whose image does not decode raises :class:`shardlock.DecodeError` naming shard,
    record and field; ``on_decode_error="skip"`` leaves it out of its batch instead
    (audited as ``decode_skipped``, counted in :attr:`decode_skips`).
    With ``device="cuda:N"``, ``decode_on="device"`` decodes on the GPU instead: the
    workers deliver the encoded bytes, nvJPEG decodes JPEGs from the locked batch into
    device memory (other images decode on the host), and a kernel applies the same
    transforms, with the same randomness, straight into the CUDA batch. It needs nvJPEG
    (``pip install nvidia-nvjpeg-cu12``, found automatically) and NVRTC, and
    ``on_decode_error="raise"``.

    ``path`` is a dataset directory, a ``file://`` URL, or ``s3://bucket/prefix``. For
    object storage, ``storage_options`` may set ``endpoint``, ``region``,
    ``access_key_id``, ``secret_access_key``, ``session_token``, ``allow_http``,
    ``cache_dir``, ``cache_bytes``, ``concurrency``, ``timeout``, ``stall_timeout``,
    ``connect_timeout``, ``range_reads`` (anything unset comes from the ``AWS_*``
    environment variables). Shards are fetched ahead of the epoch plan into
    ``cache_dir`` as ciphertext, checked against the signed manifest's size and
    SHA-256 before use; failures raise :class:`shardlock.RemoteError` with ``.kind``,
    ``.url`` and ``.shard``. With ``shuffle="global"`` and shards that do not fit in
    ``cache_bytes``, each batch instead fetches just the chunks it needs with ranged
    GETs (``range_reads="auto"``, the default; ``"always"`` / ``"never"`` force it).
    """

    def __init__(
        self,
        path: PathLike,
        *,
        keyring: Union[PathLike, Sequence[PathLike]],
        token: Optional[PathLike],
        trust: PathLike,
        batch_size: int,
        shuffle: str = "window",
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = True,
        fields: Optional[Sequence[str]] = None,
        device: str = "cpu",
        workers: Optional[int] = None,
        deny_list: Optional[PathLike] = None,
        audit_log: Optional[PathLike] = None,
        output: str = "torch",
        sample_ids: bool = False,
        memory_budget: Optional[Union[int, str]] = None,
        allow_unlocked_memory: bool = False,
        pad: bool = False,
        pinned: bool = True,
        storage_options: Optional[Mapping[str, Union[str, int, bool, float, "os.PathLike[str]"]]] = None,
        min_generation: Optional[int] = None,
        ca_cert: Optional[PathLike] = None,
        client_cert: Optional[PathLike] = None,
        client_key: Optional[PathLike] = None,
        dataloader_worker: Optional[Tuple[int, int]] = None,
        clock_skew: Optional[Union[str, int, "datetime.timedelta"]] = None,
        strings: Optional[Sequence[str]] = None,
        token_windows: Optional[TokenWindows] = None,
        decode: Optional[Mapping[str, "Image"]] = None,
        on_decode_error: str = "raise",
        decode_on: str = "workers",
    ) -> None:
        if token_windows is not None and not isinstance(token_windows, TokenWindows):
            raise TypeError(f"token_windows must be a shardlock.TokenWindows; got {type(token_windows).__name__}")
        if output not in ("torch", "numpy"):
            raise ValueError(f"output must be 'torch' or 'numpy', not {output!r}")
        batch_size, shuffle, seed, field_list = _check_args(batch_size, shuffle, seed, fields)
        rank, world_size = _rank_world(rank, world_size)
        worker_id, num_workers = _check_worker(dataloader_worker)
        _check_files(path, keyring, token, trust)
        self._device = device
        if device != "cpu" and output != "torch":
            raise ValueError("device= needs output='torch'")
        self._output = output
        self._sample_ids = sample_ids
        self._pid = os.getpid()
        self._native = NativeLoader(
            os.fspath(path),
            keyring=_keyrings(keyring),
            token=None if token is None else os.fspath(token),
            trust=os.fspath(trust),
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=bool(drop_last),
            fields=field_list,
            workers=workers,
            deny_list=None if deny_list is None else os.fspath(deny_list),
            audit_log=None if audit_log is None else os.fspath(audit_log),
            memory_budget=None if memory_budget is None else _size_arg("memory_budget", memory_budget),
            allow_unlocked_memory=allow_unlocked_memory,
            pad=pad,
            device=None if device == "cpu" else device,
            pinned=bool(pinned),
            storage_options=_storage_options(storage_options),
            min_generation=None if min_generation is None else _int_arg("min_generation", min_generation, 1),
            ca_cert=None if ca_cert is None else os.fspath(ca_cert),
            client_cert=None if client_cert is None else os.fspath(client_cert),
            client_key=None if client_key is None else os.fspath(client_key),
            worker_id=worker_id,
            num_workers=num_workers,
            clock_skew=None if clock_skew is None else _skew_arg(clock_skew),
            token_windows=None if token_windows is None else token_windows._native(),
            decode=_decode_arg(decode),
            on_decode_error=_on_decode_error_arg(on_decode_error),
            decode_on=decode_on,
            nvjpeg=_nvjpeg_wheel() if decode_on == "device" else None,
        )
        self._windows = token_windows is not None
        self.rank, self.world_size = rank, world_size
        self._strings = _check_strings(strings, self._native.field_names(), device)
        if num_workers == 1 and not self._windows and len(self._native) == 0:
            mine, total = self._native.sample_counts()
            if total > 0:  # an empty dataset is valid and yields no batch
                where = f"rank {rank} of {world_size}" if world_size > 1 else "this loader"
                if mine == 0:
                    raise ValueError(f"every epoch would be empty: {where} reads none of the dataset's {total} "
                                     "samples (more ranks than samples?)")
                raise ValueError(
                    f"every epoch would be empty: {where} reads {mine} of the dataset's {total} samples, fewer than "
                    f"batch_size={batch_size}, and drop_last=True drops a partial batch; lower batch_size or pass "
                    "drop_last=False"
                )
        # The pass rule (see the class docstring): the newest iterator's number, whether
        # its pass has started reading (and not ended), the epoch it reads, and the
        # state loaded for that epoch (JSON), which a restarted pass goes back to.
        self._pass = 0
        self._started = False
        self._pass_epoch = 0
        self._loaded: Optional[Tuple[int, str]] = None

    def _convert(self, fields: Dict[str, Any], ids: Any) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        strings = {name: _decode_strings(name, fields[name], ids) for name in self._strings}
        if self._output == "numpy":
            import numpy as np

            # Read-only: the arrays are views of the locked batch buffer, and a bytes
            # field's offsets must stay what the loader computed.
            for name, v in fields.items():
                if name in strings:
                    out[name] = strings[name]
                    continue
                for a in v[1:]:
                    a.flags.writeable = False
                if v[0] == "bool":
                    out[name] = v[1].view(np.bool_)
                elif v[0] == "list<bool>":
                    out[name] = (v[1].view(np.bool_), v[2])
                else:
                    out[name] = (v[1], v[2]) if _is_var(v[0]) else v[1]
        else:
            import torch

            for name, v in fields.items():
                # On a GPU each value is a DeviceTensor: torch.from_dlpack passes
                # torch.cuda.current_stream(), which waits for the batch's copy.
                if name in strings:
                    out[name] = strings[name]
                    continue
                t = torch.from_dlpack(v[1])
                elem = v[0][5:-1] if v[0].startswith("list<") else v[0]
                if elem == "bf16" and t.dtype != torch.bfloat16:
                    t = t.view(torch.bfloat16)
                elif elem == "bool" and t.dtype != torch.bool:
                    t = t.view(torch.bool)
                out[name] = (t, torch.from_dlpack(v[2])) if _is_var(v[0]) else t
            ids = torch.from_numpy(ids)
        if self._sample_ids:
            if "sample_id" in out:
                raise ValueError("the dataset has a field named 'sample_id'; cannot also add sample ids")
            out["sample_id"] = ids
        return out

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        """Starts a pass: the next epoch, or the unfinished one again (class docstring)."""
        if os.getpid() != self._pid:
            raise ShardlockError(
                "this Loader was created in another process (before a fork); create it inside the worker, "
                "or use shardlock.torch.IterableDataset, which does"
            )
        if self._started:
            # The previous pass stopped before its end: read its epoch again, from the
            # loaded point if a state was loaded for it, else from its beginning.
            if self._loaded is not None and self._loaded[0] == self._pass_epoch:
                self._native.load_state_json(self._loaded[1])
            else:
                self._native.set_epoch(self._pass_epoch)
            self._started = False
        self._pass += 1
        return self._batches(self._pass)

    def _batches(self, number: int) -> Iterator[Dict[str, Any]]:
        while number == self._pass:
            if not self._started:
                self._pass_epoch = self._native.epoch
                self._started = True
            nxt = self._native.next_batch()
            if nxt is None:  # the end of the epoch: the next pass reads the next one
                self._started = False
                self._loaded = None
                return
            yield self._convert(nxt[0], nxt[1])

    def __len__(self) -> int:
        """Batches the next pass yields for this rank: a whole epoch, or after a
        restore what is left of the restored epoch (a pass in progress does not
        change it). With ``token_windows`` the count is not known in advance: a
        ``TypeError``, as for any iterable without a length."""
        if self._windows:
            raise TypeError("a Loader with token_windows has no length: its windows are counted as the epoch is read")
        return len(self._native)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads (while a pass runs: the one it reads)."""
        return self._native.epoch

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the next iteration (and stops one in progress)."""
        self._native.set_epoch(_int_arg("epoch", epoch, 0))
        self._pass += 1
        self._started = False
        self._loaded = None

    @property
    def metadata(self) -> Dict[str, Any]:
        """The dataset metadata the issuer signed with the manifest (``{}`` if none)."""
        return dict(json.loads(self._native.metadata_json()))

    @property
    def decode_skips(self) -> int:
        """Samples left out so far because their image did not decode
        (``on_decode_error="skip"``)."""
        return int(self._native.decode_skips())

    @property
    def classes(self) -> Optional[List[str]]:
        """Class names in label order (``metadata["classes"]``, recorded when packing an
        image folder), like torchvision's ``ImageFolder.classes``; ``None`` if not recorded."""
        c = self.metadata.get("classes")
        return None if c is None else [str(n) for n in c]

    @property
    def fields(self) -> List[str]:
        """Names of the fields each batch holds."""
        return list(self._native.field_names())

    def state_dict(self) -> Dict[str, Any]:
        """Resume state: restore it with :meth:`load_state_dict` in a new process,
        with any worker count and (for lockstep ranks) any world size."""
        return dict(json.loads(self._native.state_json()))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continues the epoch recorded in ``state`` at the next iteration: no
        duplicates, no gaps (a pass in progress stops)."""
        text = json.dumps(state)
        self._native.load_state_json(text)
        self._pass += 1
        self._started = False
        self._loaded = (self._native.epoch, text)
