"""shardlock.ray.Datasink: Ray Data write tasks pack parts of one dataset with the
issuer's public key only, shard indices from one counter actor, and the driver
assembles; every row arrives once, and a write that fails leaves no dataset."""

import sys

import numpy as np
import pytest

import shardlock

ray = pytest.importorskip("ray", reason="Ray Data is not installed (make setup installs ray[data])")
import shardlock.ray as slray  # noqa: E402

N = 3000


@pytest.fixture(scope="module")
def local_ray():
    # Ray's workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _rows(batch):
    ids = batch["id"].astype(np.int64)
    # A 16-float tensor column (Ray's tensor extension type) and a bytes column.
    x = (ids[:, None] * 0.5 + np.arange(16, dtype=np.float32)[None, :]).astype(np.float32)
    return {"id": ids, "x": x, "tag": np.array([f"row-{i}".encode() for i in ids], dtype=object)}


def test_a_ray_dataset_packs_into_one_dataset_with_every_row_once(env, local_ray):
    out = env.root / "from-ray"
    ds = ray.data.range(N, override_num_blocks=6).map_batches(_rows)
    sink = slray.Datasink(out, keyring=env.keyring, issuer_key=env.trust, dataset_id="ray/d",
                          shard_size=8 << 10, metadata={"source": "ray"}, assemble_key=env.issuer)
    ds.write_datasink(sink)
    assert sink.records == N and sink.shards > 6, (sink.records, sink.shards)
    assert not list(out.glob("part-*.json")), "assembled: the part files are gone"
    loader = env.loader(out, dataset="ray/d", batch_size=100, shuffle="none", output="numpy", strings=["tag"])
    assert loader.metadata == {"source": "ray"}
    ids, xs, tags = [], [], []
    for b in loader:
        ids.append(b["id"])
        xs.append(b["x"])
        tags.extend(b["tag"])
    ids_a, xs_a = np.concatenate(ids), np.concatenate(xs)
    assert sorted(ids_a.tolist()) == list(range(N)), "every row exactly once"
    want = (ids_a[:, None] * 0.5 + np.arange(16, dtype=np.float32)[None, :]).astype(np.float32)
    assert xs_a.shape == (N, 16) and np.array_equal(xs_a, want)
    assert tags == [f"row-{i}" for i in ids_a]


def test_without_the_secret_key_the_parts_wait_for_assemble(env, local_ray):
    out = env.root / "parts-only"
    ds = ray.data.range(500, override_num_blocks=3).map_batches(_rows)
    sink = slray.Datasink(out, keyring=env.keyring, issuer_key=env.trust, dataset_id="ray/p",
                          columns=["id", "x"], shard_size=4 << 10)
    ds.write_datasink(sink)
    assert sink.records == 500 and list(out.glob("part-*.json"))
    with pytest.raises(shardlock.FormatError):
        env.loader(out, dataset="ray/p")
    assert shardlock.assemble(out, issuer_key=env.issuer, keyring=env.keyring) == (500, sink.shards)
    got = np.concatenate([b["id"] for b in env.loader(out, dataset="ray/p", batch_size=50, output="numpy")])
    assert sorted(got.tolist()) == list(range(500))


def test_a_failing_write_leaves_no_dataset(env, local_ray):
    out = env.root / "failed"

    def drift(batch):
        rows = _rows(batch)
        if int(batch["id"][0]) >= 200:  # a later block changes a column's type
            rows["x"] = rows["x"].astype(np.float64)
        return rows

    ds = ray.data.range(400, override_num_blocks=4).map_batches(drift)
    sink = slray.Datasink(out, keyring=env.keyring, issuer_key=env.trust, dataset_id="ray/f",
                          shard_size=4 << 10, assemble_key=env.issuer)
    with pytest.raises(Exception) as e:
        ds.write_datasink(sink)
    assert "schema" in str(e.value) or "differs" in str(e.value), e.value
    assert not (out / "manifest.json").exists()
    # The failed write is recorded: no later assemble signs what its tasks left.
    with pytest.raises(ValueError, match="failed"):
        shardlock.assemble(out, issuer_key=env.issuer, keyring=env.keyring)
