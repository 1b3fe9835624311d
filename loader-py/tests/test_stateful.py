"""torchdata's StatefulDataLoader: save mid-epoch, restore in a fresh loader, and the
two parts make exactly one epoch."""

import pytest

import shardlock.torch as sltorch

stateful = pytest.importorskip("torchdata.stateful_dataloader", reason="torchdata is not installed (make test installs it)")


def make(env, path):
    return sltorch.IterableDataset(path, keyring=env.keyring, token=env.token("numbers", "sdl.token"), trust=env.trust,
                                   batch_size=20, shuffle="window", seed=4, sample_ids=True, drop_last=False)


def test_state_round_trips_through_stateful_dataloader(env, numbers):
    path, _, _ = numbers
    dl = stateful.StatefulDataLoader(make(env, path), batch_size=None, num_workers=0)
    it = iter(dl)
    seen = []
    for _ in range(7):
        seen += next(it)["sample_id"].tolist()
    state = dl.state_dict()
    dl2 = stateful.StatefulDataLoader(make(env, path), batch_size=None, num_workers=0)
    dl2.load_state_dict(state)
    rest = [i for b in dl2 for i in b["sample_id"].tolist()]
    assert len(seen) == 140
    assert sorted(seen + rest) == list(range(1000))
