"""PyTorch integration: zero-copy lifetime, DataLoader workers, epochs, len."""

import numpy as np
import pytest
import torch

import shardlock
import shardlock.torch as sltorch


def test_a_tensor_held_past_the_next_batch_keeps_its_data(env, numbers):
    path, x, _ = numbers
    loader = env.loader(path, batch_size=10, shuffle="none", sample_ids=True, workers=2)
    it = iter(loader)
    first = next(it)
    held = first["x"]
    expect = x[first["sample_id"].numpy()].copy()
    del first
    for _ in range(30):  # the pool recycles buffers; the held one must not be reused
        nxt = next(it)
        assert not torch.equal(nxt["x"], held)
    np.testing.assert_array_equal(held.numpy(), expect)


def test_len_epochs_and_set_epoch(env, numbers):
    path, _, _ = numbers
    loader = env.loader(path, batch_size=64, shuffle="window", seed=3, sample_ids=True)
    assert len(loader) == 1000 // 64
    e0 = [int(i) for b in loader for i in b["sample_id"]]
    e1 = [int(i) for b in loader for i in b["sample_id"]]
    assert len(e0) == len(e1) == (1000 // 64) * 64 and e0 != e1
    loader.set_epoch(0)
    assert [int(i) for b in loader for i in b["sample_id"]] == e0


def ids_via_dataloader(env, path, num_workers):
    ds = sltorch.IterableDataset(
        path, keyring=env.keyring, token=env.token("numbers", f"dl{num_workers}.token"), trust=env.trust,
        batch_size=25, shuffle="global", sample_ids=True, drop_last=False,
    )
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    return [int(i) for b in dl for i in b["sample_id"]]


def test_dataloader_workers_split_without_duplicates(env, numbers):
    path, _, _ = numbers
    for workers in (0, 2):
        ids = ids_via_dataloader(env, path, workers)
        assert len(ids) == len(set(ids)), workers
        assert len(ids) >= 998 and set(ids) <= set(range(1000)), workers


def test_a_loader_used_after_fork_raises_instead_of_hanging(env, numbers):
    import multiprocessing as mp

    path, _, _ = numbers
    loader = env.loader(path, batch_size=10)
    next(iter(loader))
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        try:
            next(iter(loader))
            q.put("no error")
        except shardlock.ShardlockError as e:
            q.put(f"error: {e}")

    p = ctx.Process(target=child)
    p.start()
    p.join(30)
    assert p.exitcode == 0
    msg = q.get(timeout=5)
    assert msg.startswith("error:") and "fork" in msg


def test_a_tensor_freed_in_a_forked_child_leaves_the_parent_intact(env, numbers):
    import gc
    import multiprocessing as mp

    path, x, _ = numbers
    loader = env.loader(path, batch_size=10, shuffle="none", sample_ids=True)
    batch = next(iter(loader))
    held, ids = batch["x"], batch["sample_id"].numpy().copy()
    del batch
    ctx = mp.get_context("fork")

    def child(t=held):
        del t
        gc.collect()

    procs = [ctx.Process(target=child) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    np.testing.assert_array_equal(held.numpy(), x[ids])
    assert len(list(loader)) > 0


def test_a_peek_does_not_take_a_batch_from_the_next_pass(env, numbers):
    path, _, _ = numbers
    loader = env.loader(path, batch_size=64, shuffle="window", seed=3, sample_ids=True)
    reference = env.loader(path, batch_size=64, shuffle="window", seed=3, sample_ids=True)
    e0 = [b["sample_id"].tolist() for b in reference]
    e1 = [b["sample_id"].tolist() for b in reference]
    peeked = next(iter(loader))
    assert peeked["sample_id"].tolist() == e0[0]
    assert len(loader) == len(e0) == 1000 // 64  # the peek does not change len()
    # The peeked pass did not end: the next one reads the same epoch from its beginning.
    assert [b["sample_id"].tolist() for b in loader] == e0
    assert [b["sample_id"].tolist() for b in loader] == e1


def test_a_restarted_pass_after_a_restore_starts_at_the_restored_point(env, numbers):
    path, _, _ = numbers
    first = env.loader(path, batch_size=50, seed=2, sample_ids=True)
    it = iter(first)
    seen = [i for _ in range(4) for i in next(it)["sample_id"].tolist()]
    state = first.state_dict()
    loader = env.loader(path, batch_size=50, seed=2, sample_ids=True)
    loader.load_state_dict(state)
    assert len(loader) == 16
    next(iter(loader))  # a peek
    assert len(loader) == 16
    rest = [i for b in loader for i in b["sample_id"].tolist()]
    assert sorted(seen + rest) == list(range(1000))


def test_only_the_newest_iterator_yields(env, numbers):
    path, _, _ = numbers
    loader = env.loader(path, batch_size=100, shuffle="none", sample_ids=True)
    old = iter(loader)
    next(old)
    new = iter(loader)
    assert len(list(new)) == 10
    with pytest.raises(StopIteration):
        next(old)
