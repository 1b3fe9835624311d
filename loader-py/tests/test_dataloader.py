"""shardlock.torch through a DataLoader: epochs advance in workers, drop_last once per
rank, worker errors keep their class and attributes, re-batching is flagged, and the
rank's state restores with any worker count (issue #20)."""

import numpy as np
import pytest
import torch

import shardlock
import shardlock.torch as sltorch


def dataset(env, path, **kw):
    kw.setdefault("batch_size", 64)
    kw.setdefault("sample_ids", True)
    kw.setdefault("seed", 11)
    kw.setdefault("token", env.token(path.name, "dl.token"))
    return sltorch.IterableDataset(path, keyring=env.keyring, trust=env.trust, **kw)


def ids(batches):
    return [int(i) for b in batches for i in b["sample_id"]]


def batch_ids(batches):
    return [b["sample_id"].tolist() for b in batches]


@pytest.fixture
def two_thousand(env):
    """2,000 samples: y = i64 i, over many small shards."""
    return env.pack("two-k", {"y": np.arange(2000, dtype=np.int64)}, shard_size=2048)


@pytest.mark.parametrize("persistent", [False, True])
def test_each_pass_reads_the_next_epoch_in_every_worker(env, numbers, persistent):
    path, _, _ = numbers
    ds = dataset(env, path, drop_last=False)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent)
    e0, e1 = ids(dl), ids(dl)
    assert sorted(e0) == sorted(e1) == list(range(1000))
    assert e0 != e1, "the second pass must be another epoch"
    assert ds.state_dict()["epoch"] == 2, "the training process's state tracks the passes"
    ds.set_epoch(0)
    assert ids(dl) == e0
    # The same batches, in the same order, as one Loader on the rank.
    loader = env.loader(path, token=env.token("numbers", "one.token"), batch_size=64, sample_ids=True, seed=11,
                        drop_last=False)
    assert batch_ids(torch.utils.data.DataLoader(dataset(env, path, drop_last=False), batch_size=None,
                                                 num_workers=3)) == batch_ids(loader)


def test_drop_last_drops_one_partial_batch_per_rank_not_per_worker(env, two_thousand):
    # 2,000 samples, batch 64: a Loader yields 31 batches (1,984 samples).
    one = ids(dataset(env, two_thousand))
    assert len(one) == 1984
    for workers in (2, 3):
        got = ids(torch.utils.data.DataLoader(dataset(env, two_thousand), batch_size=None, num_workers=workers))
        assert len(got) == 1984 and len(set(got)) == 1984, workers
    # 2 ranks x 2 workers: each rank 1,000 samples, 15 batches: 1,920 in all.
    per_rank = [ids(torch.utils.data.DataLoader(dataset(env, two_thousand, rank=r, world_size=2), batch_size=None,
                                                num_workers=2)) for r in (0, 1)]
    assert [len(p) for p in per_rank] == [960, 960] and not set(per_rank[0]) & set(per_rank[1])
    # drop_last=False: every sample exactly once across ranks and workers.
    every = [ids(torch.utils.data.DataLoader(dataset(env, two_thousand, rank=r, world_size=2, drop_last=False),
                                             batch_size=None, num_workers=3)) for r in (0, 1)]
    assert sorted(every[0] + every[1]) == list(range(2000))


def test_len_is_the_batches_a_rank_gets(env, two_thousand):
    for kw, want in (({}, 31), ({"drop_last": False}, 32), ({"rank": 1, "world_size": 2}, 15)):
        ds = dataset(env, two_thousand, **kw)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        assert len(ds) == len(dl) == want, kw
        assert sum(1 for _ in dl) == want, kw


def test_worker_errors_keep_their_class_and_attributes(env, numbers):
    path, _, _ = numbers
    narrow = env.token("numbers", "narrow.token", shards="1-2")
    for workers in (0, 1):
        dl = torch.utils.data.DataLoader(dataset(env, path, token=narrow, shuffle="none"), batch_size=None,
                                         num_workers=workers)
        with pytest.raises(shardlock.OutOfScope) as e:
            list(dl)
        assert e.value.reason == "shard_out_of_scope" and e.value.shard == 0 and e.value.dataset == "numbers", workers
        assert "shardlock-error-attributes" not in str(e.value)


def test_a_dataloader_batch_size_is_flagged(env, numbers):
    path, _, _ = numbers
    with pytest.warns(UserWarning, match="batch_size=None"):
        first = next(iter(torch.utils.data.DataLoader(dataset(env, path), num_workers=0)))
    assert first["y"].shape == (1, 64)
    with pytest.raises(ValueError, match="dataset's"):
        sltorch.DataLoader(dataset(env, path), batch_size=64)


def test_arguments_are_checked_in_the_constructor(env, numbers):
    path, _, _ = numbers
    with pytest.raises(ValueError, match="batch_size"):
        dataset(env, path, batch_size=0)
    with pytest.raises(ValueError, match="did you mean"):
        dataset(env, path, fields="x")
    with pytest.raises(ValueError, match="shuffle"):
        dataset(env, path, shuffle=True)
    with pytest.raises(FileNotFoundError, match="token") as e:
        dataset(env, path, token=env.root / "mistyped.token")
    assert e.value.filename == str(env.root / "mistyped.token")
    with pytest.raises(FileNotFoundError, match="dataset directory"):
        dataset(env, env.root / "no-such-dataset", token=env.token("numbers"))
    with pytest.raises(TypeError, match="batch_size"):
        sltorch.IterableDataset(path, keyring=env.keyring, token=env.token("numbers"), trust=env.trust)
    # What only the dataset can tell, too: a field it lacks, a batch larger than the rank.
    with pytest.raises(ValueError, match="no field"):
        dataset(env, path, fields=["nope"])
    with pytest.raises(ValueError, match="batch_size=5000"):
        dataset(env, path, batch_size=5000)


def test_transform_runs_in_the_workers(env, numbers):
    path, _, _ = numbers

    ds = dataset(env, path, transform=_double, drop_last=False)
    got = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(int(v) for b in got for v in b["twice"]) == [2 * i for i in range(1000)]


def _double(batch):
    return {"twice": batch["y"] * 2}


@pytest.mark.parametrize("restore_workers", [0, 1, 3])
def test_shardlock_dataloader_state_restores_with_any_worker_count(env, numbers, restore_workers):
    path, _, _ = numbers
    dl = sltorch.DataLoader(dataset(env, path, batch_size=20, drop_last=False), num_workers=2)
    assert dl.batch_size is None and dl.persistent_workers
    first_epoch = ids(dl)
    assert sorted(first_epoch) == list(range(1000))
    it = iter(dl)
    seen = [int(i) for _ in range(7) for i in next(it)["sample_id"]]
    state = dl.state_dict()
    assert state["epoch"] == 1 and state["consumed"] == [{"world": 1, "per_rank": 140}]
    del it
    dl2 = sltorch.DataLoader(dataset(env, path, batch_size=20, drop_last=False), num_workers=restore_workers)
    dl2.load_state_dict(state)
    rest = ids(dl2)
    assert len(seen) == 140 and sorted(seen + rest) == list(range(1000))
    assert dl2.state_dict()["epoch"] == 2
    assert sorted(ids(dl2)) == list(range(1000))


def test_shardlock_torch_is_imported_on_first_use():
    import subprocess
    import sys

    code = ("import sys, shardlock; assert 'shardlock.torch' not in sys.modules; "
            "assert shardlock.torch.DataLoader.__module__ == 'shardlock.torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_epochs_stay_in_step_when_the_worker_count_changes(env, numbers):
    path, _, _ = numbers
    ds = dataset(env, path, drop_last=False)
    peeked = next(iter(ds))["sample_id"].tolist()  # a pass in this process, abandoned
    assert len(peeked) == 64
    for workers in (2, 0, 1, 2):
        got = ids(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
        assert sorted(got) == list(range(1000)), workers


def test_a_state_saved_after_the_last_partial_batch_restores(env, numbers):
    path, _, _ = numbers
    dl = sltorch.DataLoader(dataset(env, path, drop_last=False), num_workers=2)
    n = 0
    for _ in dl:
        n += 1
        state = dl.state_dict()
    assert n == 16 and state["consumed"] == [{"world": 1, "per_rank": 1000}]
    dl2 = sltorch.DataLoader(dataset(env, path, drop_last=False), num_workers=1)
    dl2.load_state_dict(state)
    assert ids(dl2) == []
    with pytest.raises(ValueError, match="in_order"):
        sltorch.DataLoader(dataset(env, path), num_workers=2, in_order=False)


def test_an_error_at_the_start_of_a_persistent_workers_pass_reaches_the_trainer(env, numbers):
    path, _, _ = numbers
    dl = sltorch.DataLoader(dataset(env, path), num_workers=1)
    first = ids(dl)
    dl.load_state_dict({"epoch": 0, "seed": 11, "consumed": []})
    with pytest.raises(shardlock.ShardlockError, match="persistent DataLoader workers started"):
        ids(dl)
    assert len(first) == 960


def test_worker_errors_keep_attributes_that_are_none(env, numbers):
    path, _, _ = numbers
    shard = sorted(path.glob("shard-*.slk"))[0]
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 1  # the header: an IntegrityError with chunk=None
    shard.write_bytes(bytes(raw))
    dl = torch.utils.data.DataLoader(dataset(env, path, shuffle="none"), batch_size=None, num_workers=1)
    with pytest.raises(shardlock.IntegrityError) as e:
        list(dl)
    with pytest.raises(shardlock.IntegrityError) as direct:
        list(dataset(env, path, shuffle="none"))
    assert direct.value.chunk is None and direct.value.kind == "header_mismatch"
    for k in ("kind", "dataset", "shard", "chunk"):
        assert getattr(e.value, k) == getattr(direct.value, k), k
