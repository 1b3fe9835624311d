"""shardlock.Mix: weighted, deterministic interleaving of datasets, each authorized on
its own, per-stream epochs, exact resume, the same schedule as Rust's Mix (#18)."""

import numpy as np
import pytest

import shardlock
from shardlock._lib import mix_choices


def two(env):
    a = env.pack("a", {"x": np.arange(96, dtype=np.int64), "src": np.zeros(96, dtype=np.int64)})
    b = env.pack("b", {"x": np.arange(1000, 1020, dtype=np.int64), "src": np.ones(20, dtype=np.int64)})
    return a, b


def mix(env, a, b, steps=None, rank=0, world_size=1):
    def lo(p):
        return env.loader(p, batch_size=4, shuffle="window", seed=3, output="numpy", rank=rank, world_size=world_size,
                          token=env.token(p.name, f"{p.name}.token"))
    return shardlock.Mix([(lo(a), 3), (lo(b), 1)], seed=11, steps=steps)


def take(m):
    out = []
    for batch in m:
        assert (batch["src"] == m.stream).all()
        out.append((m.stream, batch["x"].tolist()))
    return out


def test_weights_epochs_and_determinism(env):
    a, b = two(env)
    m = mix(env, a, b, steps=400)
    assert len(m) == 400
    got = take(m)
    assert len(got) == 400 and len(m) == 0
    from_b = sum(1 for s, _ in got if s == 1)
    assert abs(from_b - 100) < 5 * 8.7, from_b  # p = 0.25 over 400 draws
    # b's epochs: 5 batches each, every sample once per epoch.
    b_ids = [x for s, xs in got if s == 1 for x in xs]
    for e in range(len(b_ids) // 20):
        assert sorted(b_ids[e * 20:(e + 1) * 20]) == list(range(1000, 1020)), e
    assert m.epochs[1] >= len(b_ids) // 20 - 1
    # The schedule is Rust's Mix::choose, the same for every process.
    assert [s for s, _ in got] == mix_choices(11, [3.0, 1.0], 0, 400)
    assert got == take(mix(env, a, b, steps=400))


def test_state_dict_resumes_exactly_in_a_new_mix(env):
    a, b = two(env)
    whole = take(mix(env, a, b, steps=90))
    first = mix(env, a, b, steps=90)
    it = iter(first)
    head = []
    for _ in range(37):
        batch = next(it)
        head.append((first.stream, batch["x"].tolist()))
    state = first.state_dict()
    resumed = mix(env, a, b, steps=90)
    resumed.load_state_dict(state)
    assert len(resumed) == 53
    assert head + take(resumed) == whole
    other = shardlock.Mix([(env.loader(a, token=env.token("a", "a2.token")), 1)], seed=11)
    with pytest.raises(ValueError, match="weights"):
        other.load_state_dict(state)


def test_ranks_draw_the_same_streams_and_split_them(env):
    a, b = two(env)
    r0 = take(mix(env, a, b, steps=40, rank=0, world_size=2))
    r1 = take(mix(env, a, b, steps=40, rank=1, world_size=2))
    for (s0, x0), (s1, x1) in zip(r0, r1):
        assert s0 == s1 and not set(x0) & set(x1)


def test_bad_streams_and_weights_are_refused(env):
    a, _ = two(env)
    lo = env.loader(a, token=env.token("a", "a3.token"))
    for streams, err in [([], ValueError), ([(lo, 0)], ValueError), ([(lo, float("nan"))], ValueError),
                         ([("not a loader", 1)], TypeError)]:
        with pytest.raises(err):
            shardlock.Mix(streams)
    with pytest.raises(TypeError, match="no length"):
        len(shardlock.Mix([(lo, 1)]))
    # A stream whose token does not cover it fails at its first batch, typed.
    wrong = env.loader(a, token=env.token("b", "b-only.token"))
    with pytest.raises(shardlock.AccessDenied):
        next(iter(shardlock.Mix([(wrong, 1)], steps=3)))
