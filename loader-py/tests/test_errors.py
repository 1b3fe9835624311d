"""Every error class raised from Python for its cause."""

import numpy as np
import pytest

import shardlock


def test_class_hierarchy():
    for cls in (shardlock.TokenExpired, shardlock.TokenRevoked, shardlock.OutOfScope, shardlock.InvalidToken):
        assert issubclass(cls, shardlock.AccessDenied)
    for cls in (shardlock.AccessDenied, shardlock.IntegrityError, shardlock.KeyUnavailable, shardlock.FormatError):
        assert issubclass(cls, shardlock.ShardlockError)


def first_batch(loader):
    return next(iter(loader))


def test_token_errors(env, numbers):
    path, _, _ = numbers
    # A mistyped path fails at construction, naming the file, not at the first batch.
    with pytest.raises(FileNotFoundError, match="token file not found") as e:
        env.loader(path, token=env.root / "missing.token")
    assert e.value.filename == str(env.root / "missing.token")
    with pytest.raises(FileNotFoundError, match="keyring file"):
        shardlock.Loader(path, keyring=env.root / "kr.json", token=env.token("numbers"), trust=env.trust, batch_size=8)
    with pytest.raises(FileNotFoundError, match="trust"):
        shardlock.Loader(path, keyring=env.keyring, token=env.token("numbers"), trust=env.root / "i.pub", batch_size=8)
    garbage = env.root / "garbage.token"
    garbage.write_text("not a token")
    with pytest.raises(shardlock.InvalidToken) as e:
        first_batch(env.loader(path, token=garbage))
    assert e.value.reason in ("invalid_token", "missing_token")
    with pytest.raises(shardlock.OutOfScope) as e:
        first_batch(env.loader(path, token=env.token("another-dataset")))
    assert e.value.reason == "wrong_dataset" and e.value.dataset == "numbers" and e.value.shard is not None
    narrow = env.token("numbers", "narrow.token", shards="1-2")
    with pytest.raises(shardlock.OutOfScope) as e:
        first_batch(env.loader(path, token=narrow, shuffle="none"))
    assert e.value.shard == 0 and e.value.reason == "shard_out_of_scope"
    future = env.token("numbers", "future.token", not_before="4000000000")
    with pytest.raises(shardlock.TokenExpired):
        first_batch(env.loader(path, token=future))
    deny = env.root / "deny.txt"
    tok = env.token("numbers", "revoked.token")
    shardlock.revoke_token(tok, deny)
    with pytest.raises(shardlock.TokenRevoked):
        first_batch(env.loader(path, token=tok, deny_list=deny))


def test_tamper_is_an_integrity_error_naming_shard_and_chunk(env, numbers):
    path, _, _ = numbers
    shard = path / "shard-00001.slk"
    data = bytearray(shard.read_bytes())
    data[-30] ^= 1
    shard.write_bytes(bytes(data))
    loader = env.loader(path, shuffle="none", batch_size=1)
    with pytest.raises(shardlock.IntegrityError) as e:
        for _ in loader:
            pass
    assert e.value.shard == 1 and e.value.kind == "chunk_auth" and e.value.chunk is not None


def test_wrong_keyring_is_key_unavailable(env, numbers):
    path, _, _ = numbers
    other = env.root / "other.json"
    shardlock.create_keyring(other)
    loader = shardlock.Loader(path, keyring=other, token=env.token("numbers"), trust=env.trust, batch_size=4)
    with pytest.raises(shardlock.KeyUnavailable):
        first_batch(loader)


def test_bad_arguments_are_value_errors(env, numbers):
    path, _, _ = numbers
    with pytest.raises(ValueError):
        env.loader(path, shuffle="sideways")
    with pytest.raises(ValueError):
        env.loader(path, fields=["nope"])
    # An empty dataset is valid: it has no shards and yields no batch.
    n = shardlock.pack_numpy(env.root / "e", {"a": np.zeros((0, 2))}, keyring=env.keyring, issuer_key=env.issuer, dataset_id="e")
    assert n == 0
    assert len(env.loader(env.root / "e")) == 0 and list(env.loader(env.root / "e")) == []


def test_bad_batch_size_fields_and_shuffle_name_the_argument(env, numbers):
    path, _, _ = numbers
    for kw, what in [
        ({"batch_size": -1}, "batch_size must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"fields": "xy"}, "list of field names"),  # not ['x', 'y']
        ({"fields": ["x", 1]}, "list of field names"),
        ({"shuffle": True}, "'none', 'window', 'global'"),
        ({"shuffle": "sideways"}, "'none', 'window', 'global'"),
        ({"seed": -1}, "seed must be at least 0"),
        ({"rank": -1, "world_size": 2}, "rank must be at least 0"),
        ({"rank": 0, "world_size": 0}, "world_size must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=what):
            env.loader(path, **kw)
    assert env.loader(path, batch_size=np.int64(8), fields=("x",)).fields == ["x"]
