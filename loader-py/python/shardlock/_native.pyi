"""Type stubs of the native extension (checked against the built module by stubtest)."""

from os import PathLike
from typing import Any, Callable, Dict, List, Optional, Tuple, Union, final

import numpy as np

__all__ = [
    "AccessDenied",
    "AuditError",
    "BatchOwner",
    "DecodeError",
    "DeviceError",
    "DeviceTensor",
    "DeviceUnavailable",
    "FormatError",
    "IMAGE_EXTENSIONS",
    "IntegrityError",
    "InvalidToken",
    "KeyUnavailable",
    "MemoryLockError",
    "NativeLoader",
    "NativeSource",
    "NativeWriter",
    "OutOfScope",
    "RemoteError",
    "ShardlockError",
    "TokenExpired",
    "TokenRevoked",
    "attenuate_token",
    "create_hsm_kek",
    "create_issuer_key",
    "create_keyring",
    "assemble",
    "issue_token",
    "mix_choices",
    "revoke_token",
    "write_leases",
    "__version__",
]

__version__: str

class ShardlockError(Exception): ...
class AccessDenied(ShardlockError): ...
class TokenExpired(AccessDenied): ...
class TokenRevoked(AccessDenied): ...
class OutOfScope(AccessDenied): ...
class InvalidToken(AccessDenied): ...
class IntegrityError(ShardlockError): ...
class KeyUnavailable(ShardlockError): ...
class FormatError(ShardlockError): ...
class MemoryLockError(ShardlockError): ...
class AuditError(ShardlockError): ...
class DeviceUnavailable(ShardlockError): ...
class DeviceError(ShardlockError): ...
class DecodeError(ShardlockError): ...
class RemoteError(ShardlockError): ...

_Path = Union[str, PathLike[str]]

def create_keyring(path: _Path) -> str: ...
def write_leases(dir: _Path, issued: int, failed: Optional[str] = None) -> None: ...
def assemble(
    dir: str, issuer_key: _Path, keyring: List[str], generation: Optional[int] = None,
    storage_options: Optional[List[Tuple[str, str]]] = None,
) -> Tuple[int, int]: ...
def create_issuer_key(path: _Path) -> str: ...
def create_hsm_kek(uri: str) -> str: ...
def issue_token(
    issuer_key: _Path,
    out: _Path,
    *,
    dataset: str,
    principal: str,
    shards: str = "all",
    ops: str = "read",
    ttl: str = "1h",
    not_before: Optional[str] = None,
    min_generation: Optional[int] = None,
) -> str: ...
def attenuate_token(
    token: _Path,
    trust: _Path,
    out: _Path,
    *,
    shards: Optional[str] = None,
    ops: Optional[str] = None,
    ttl: Optional[str] = None,
    min_generation: Optional[int] = None,
) -> str: ...
def revoke_token(token: _Path, deny_list: _Path) -> str: ...
def mix_choices(seed: int, weights: List[float], start: int, count: int) -> List[int]: ...

@final
class NativeWriter:
    def __new__(
        cls,
        out_dir: str,
        keyring: _Path,
        issuer_key: _Path,
        dataset_id: str,
        fields: List[Tuple[str, str, List[int]]],
        shard_size: int,
        force: bool = False,
        generation: Optional[int] = None,
        metadata_json: Optional[str] = None,
        part: Union[Tuple[int, Optional[int]], Callable[[], int], None] = None,
        compress: List[str] = ...,
        storage_options: Optional[List[Tuple[str, str]]] = None,
    ) -> NativeWriter: ...
    def write_sample(self, values: List[bytes]) -> None: ...
    def write_columns(self, columns: List[bytes], n: int, offsets: Optional[List[Optional[bytes]]] = None) -> None: ...
    def write_source(self, source: NativeSource) -> Tuple[int, int]: ...
    def finish(self) -> Tuple[int, int]: ...
    def abort(self) -> None: ...

IMAGE_EXTENSIONS: List[str]

@final
class NativeSource:
    def __new__(cls, paths: List[_Path], format: str = "auto", parse: List[str] = ...) -> NativeSource: ...
    def fields(self) -> List[Tuple[str, str, List[int]]]: ...
    def metadata_json(self) -> str: ...
    def samples(self) -> Optional[int]: ...

@final
class BatchOwner: ...

@final
class DeviceTensor:
    def __dlpack_device__(self) -> Tuple[int, int]: ...
    def __dlpack__(
        self,
        *,
        stream: Optional[int] = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
    @property
    def shape(self) -> List[int]: ...

@final
class NativeLoader:
    def __new__(
        cls,
        path: _Path,
        *,
        keyring: List[_Path],
        token: Optional[_Path],
        trust: _Path,
        batch_size: int,
        shuffle: str,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        fields: Optional[List[str]] = None,
        workers: Optional[int] = None,
        deny_list: Optional[_Path] = None,
        audit_log: Optional[_Path] = None,
        memory_budget: Optional[int] = None,
        allow_unlocked_memory: bool = False,
        pad: bool = False,
        window_shards: Optional[int] = None,
        device: Optional[str] = None,
        pinned: bool = True,
        storage_options: Optional[List[Tuple[str, str]]] = None,
        min_generation: Optional[int] = None,
        ca_cert: Optional[_Path] = None,
        client_cert: Optional[_Path] = None,
        client_key: Optional[_Path] = None,
        worker_id: int = 0,
        num_workers: int = 1,
        clock_skew: Optional[str] = None,
        token_windows: Optional[Tuple[str, int, Optional[int], bool, int, Optional[int], bool, int]] = None,
        decode: Optional[List[Tuple[Any, ...]]] = None,
        on_decode_error: str = "raise",
        decode_on: str = "workers",
        nvjpeg: Optional[_Path] = None,
    ) -> NativeLoader: ...
    def decode_skips(self) -> int: ...
    def next_batch(self) -> Optional[Tuple[Dict[str, Tuple[Any, ...]], np.ndarray]]: ...
    def __len__(self) -> int: ...
    def sample_counts(self) -> Tuple[int, int]: ...
    @property
    def epoch(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def metadata_json(self) -> str: ...
    def field_names(self) -> List[str]: ...
    def state_json(self) -> str: ...
    def load_state_json(self, state: str) -> None: ...
