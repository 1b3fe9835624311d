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


def test_a_list_of_keyrings_unwraps_each_key_with_the_one_that_holds_it(env, numbers):
    path, _, _ = numbers
    other = env.root / "other.json"
    shardlock.create_keyring(other)
    token = env.token("numbers")
    kw = dict(token=token, trust=env.trust, batch_size=4, shuffle="none")
    want = [b["x"].clone() for b in shardlock.Loader(path, keyring=env.keyring, **kw)]
    got = [b["x"] for b in shardlock.Loader(path, keyring=[other, env.keyring], **kw)]
    assert len(got) == len(want) and all(bool((g == w).all()) for g, w in zip(got, want))
    with pytest.raises(shardlock.KeyUnavailable) as e:
        first_batch(shardlock.Loader(path, keyring=(other,), **kw))
    assert "other.json" in str(e.value)
    with pytest.raises(ValueError, match="non-empty list"):
        shardlock.Loader(path, keyring=[], **kw)
    with pytest.raises(FileNotFoundError, match="keyring file"):
        shardlock.Loader(path, keyring=[env.keyring, env.root / "missing.json"], **kw)


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


def test_python_takes_the_cli_sizes_and_durations_and_one_dataset_id_name(env, numbers):
    import datetime

    path, _, _ = numbers
    arrays = {"y": np.arange(300, dtype=np.int64)}
    assert shardlock.pack_numpy(env.root / "sized", arrays, keyring=env.keyring, issuer_key=env.issuer,
                                dataset_id="sized", shard_size="1k") == 300
    with pytest.raises(ValueError, match="shard_size"):
        shardlock.pack_numpy(env.root / "bad", arrays, keyring=env.keyring, issuer_key=env.issuer, dataset_id="bad",
                             shard_size="64 parsecs")
    tok = env.root / "t1.token"
    rid = shardlock.issue_token(env.issuer, tok, dataset_id="sized", principal="p", ttl=datetime.timedelta(minutes=5))
    assert len(rid) > 32  # the revocation id
    loader = shardlock.Loader(env.root / "sized", keyring=env.keyring, token=tok, trust=env.trust, batch_size=100,
                              memory_budget="8MiB", drop_last=False)
    assert sum(len(b["y"]) for b in loader) == 300
    for ttl in ("0s", 0, -5, datetime.timedelta(0)):
        with pytest.raises(ValueError, match="positive|at least 1"):
            shardlock.issue_token(env.issuer, env.root / "t0.token", dataset_id="sized", principal="p", ttl=ttl)
    with pytest.raises(ValueError, match="disagree"):
        shardlock.issue_token(env.issuer, env.root / "t2.token", dataset_id="a", dataset="b", principal="p")
    # The older spelling still works.
    assert shardlock.issue_token(env.issuer, env.root / "t3.token", dataset="sized", principal="p", ttl=60)


def test_a_batch_larger_than_the_rank_is_refused_at_construction(env, numbers):
    path, _, _ = numbers
    with pytest.raises(ValueError, match="batch_size=2000.*drop_last=False"):
        env.loader(path, batch_size=2000)
    assert len(env.loader(path, batch_size=2000, drop_last=False)) == 1
    with pytest.raises(ValueError, match="rank 1 of 2"):
        env.loader(path, batch_size=600, rank=1, world_size=2)


def test_a_key_file_in_the_wrong_place_is_named_with_the_right_one(env, numbers):
    path, _, _ = numbers
    tok = env.token("numbers")
    # The issuer's secret key as the trust anchor.
    with pytest.raises(shardlock.FormatError, match="this is the issuer's secret key; pass .*issuer.key.pub") as e:
        shardlock.Loader(path, keyring=env.keyring, token=tok, trust=env.issuer, batch_size=8)
    assert "secret" in str(e.value) and "consider the key exposed" not in str(e.value)
    # The public key where the secret key goes (a 0644 file: not "consider the key exposed").
    with pytest.raises(shardlock.FormatError, match=r"this is the issuer's public key \(the trust anchor\); pass "
                                                    r".*issuer.key \(the secret key\) here"):
        shardlock.issue_token(env.trust, env.root / "x.token", dataset_id="numbers", principal="p")
    with pytest.raises(shardlock.FormatError, match="this is the issuer's public key.*pass the KEK keyring"):
        shardlock.Loader(path, keyring=env.trust, token=tok, trust=env.trust, batch_size=8)
    with pytest.raises(shardlock.FormatError, match="this is a KEK keyring"):
        shardlock.Loader(path, keyring=env.keyring, token=tok, trust=env.keyring, batch_size=8)


def test_token_expired_says_when_and_the_time_now_and_clock_skew_is_settable(env, numbers):
    import time

    path, _, _ = numbers
    later = env.token("numbers", "later.token", not_before="4000000000")
    with pytest.raises(shardlock.TokenExpired, match=r"not valid before 2096-10-02T07:06:40Z; it is now 20") as e:
        first_batch(env.loader(path, token=later))
    assert e.value.reason == "not_yet_valid" and "check if" not in str(e.value)
    short = env.token("numbers", "short.token", ttl="1s")
    time.sleep(1.5)
    assert first_batch(env.loader(path, token=short))  # within the default 30 s of skew
    with pytest.raises(shardlock.TokenExpired, match=r"the token expired at .*Z; it is now .*Z \(clock skew allowed: 0 s\)"):
        first_batch(env.loader(path, token=short, clock_skew="0s"))
    with pytest.raises(shardlock.TokenExpired):
        first_batch(env.loader(path, token=short, clock_skew=0))
