"""Loader(token_windows=TokenWindows(...)): documents of a list field as fixed-length
int64 windows for language models, every token once per epoch, exact resume (#18)."""

import numpy as np
import pytest

import shardlock

SEQ = 31
EOS = 0


@pytest.fixture
def docs(env):
    rng = np.random.default_rng(4)
    docs = [rng.integers(1, 60_000, int(n), dtype=np.uint32) for n in rng.integers(0, 200, 300)]
    docs[10] = np.arange(1, 12_000, dtype=np.uint32)  # spans chunks and many windows
    with shardlock.Writer(env.root / "docs", keyring=env.keyring, issuer_key=env.issuer, dataset_id="docs",
                          schema={"tokens": "list<u32>"}, shard_size="64k") as w:
        for d in docs:
            w.write({"tokens": d})
    return env.root / "docs", docs


def loader(env, path, tw, **kw):
    kw.setdefault("batch_size", 4)
    return shardlock.Loader(path, keyring=env.keyring, token=env.token("docs", "docs.token"), trust=env.trust,
                            token_windows=tw, seed=1, **kw)


def stream(docs):
    ids, pos = [], []
    for d in docs:
        ids += d.tolist() + [EOS]
        pos += list(range(len(d) + 1))
    return np.array(ids), np.array(pos)


def test_windows_are_the_documents_in_order_with_positions(env, docs):
    path, ds = docs
    tw = shardlock.TokenWindows("tokens", SEQ, eos=EOS, positions=True, shuffle_windows=1)
    lo = loader(env, path, tw, shuffle="none")
    with pytest.raises(TypeError, match="no length"):
        len(lo)
    got = list(lo)
    torch = pytest.importorskip("torch")
    assert got[0]["tokens"].dtype == torch.int64 and got[0]["tokens"].shape == (4, SEQ + 1)
    ids = torch.cat([b["tokens"] for b in got]).reshape(-1).numpy()
    pos = torch.cat([b["position_ids"] for b in got]).reshape(-1).numpy()
    want_ids, want_pos = stream(ds)
    n = len(want_ids) // (SEQ + 1) // 4 * 4 * (SEQ + 1)  # whole windows, whole batches
    np.testing.assert_array_equal(ids, want_ids[:n])
    np.testing.assert_array_equal(pos, want_pos[:n])


def test_shuffled_windows_resume_exactly_and_narrow_dtype(env, docs):
    path, _ = docs
    tw = shardlock.TokenWindows("tokens", SEQ, eos=EOS, shuffle_windows=16)
    whole = [b["tokens"].tolist() for b in loader(env, path, tw, output="numpy", shuffle="global")]
    lo = loader(env, path, tw, output="numpy", shuffle="global")
    it = iter(lo)
    head = [next(it)["tokens"].tolist() for _ in range(13)]
    state = lo.state_dict()
    assert "tokens" in state
    again = loader(env, path, tw, output="numpy", shuffle="global")
    again.load_state_dict(state)
    assert head + [b["tokens"].tolist() for b in again] == whole
    narrow = loader(env, path, shardlock.TokenWindows("tokens", SEQ, widen=False), output="numpy")
    assert next(iter(narrow))["tokens"].dtype == np.uint32


def test_bad_token_windows_are_refused(env, docs):
    path, _ = docs
    with pytest.raises(TypeError, match="TokenWindows"):
        loader(env, path, {"field": "tokens"})
    with pytest.raises(ValueError, match="no field"):
        loader(env, path, shardlock.TokenWindows("nope", SEQ))
    with pytest.raises(ValueError, match="seq_len"):
        loader(env, path, shardlock.TokenWindows("tokens", 0))
    with pytest.raises(ValueError, match="on the host"):
        loader(env, path, shardlock.TokenWindows("tokens", SEQ), device="cuda:0")
