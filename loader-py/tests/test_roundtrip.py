"""Numpy -> Writer -> Loader round trips: every dtype, shapes, bytes fields."""

import numpy as np
import pytest
import torch

import shardlock

DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64"]


def test_every_dtype_and_bf16_roundtrip_exactly(env):
    rng = np.random.default_rng(1)
    n = 300
    arrays = {f"f_{d}": (rng.standard_normal((n, 2, 3)) * 100).astype(d) for d in DTYPES}
    with shardlock.Writer(env.root / "all", keyring=env.keyring, issuer_key=env.issuer, dataset_id="all", shard_size=8192) as w:
        for j in range(n):
            sample = {k: v[j] for k, v in arrays.items()}
            sample["bf"] = torch.tensor([float(j), -0.5], dtype=torch.bfloat16)
            sample["blob"] = b"x" * (j % 17)
            w.write(sample)
    got = {k: [] for k in list(arrays) + ["bf", "blob"]}
    loader = env.loader(env.root / "all", batch_size=32, shuffle="none", drop_last=False)
    for batch in loader:
        for k in arrays:
            assert isinstance(batch[k], torch.Tensor)
            got[k].append(batch[k].clone())
        assert batch["bf"].dtype == torch.bfloat16
        got["bf"].append(batch["bf"].clone())
        values, offsets = batch["blob"]
        got["blob"].extend(bytes(values[offsets[i] : offsets[i + 1]].numpy()) for i in range(len(offsets) - 1))
    for k, v in arrays.items():
        back = torch.cat(got[k]).numpy()
        assert back.dtype == v.dtype and back.shape == v.shape
        np.testing.assert_array_equal(back, v)
    bf = torch.cat(got["bf"])
    assert bf.shape == (n, 2)
    assert torch.equal(bf[:, 0], torch.arange(n, dtype=torch.bfloat16))
    assert got["blob"] == [b"x" * (j % 17) for j in range(n)]


def test_numpy_output_and_sample_ids(env, numbers):
    path, x, i = numbers
    loader = env.loader(path, output="numpy", sample_ids=True, shuffle="global", batch_size=50)
    seen = []
    for batch in loader:
        assert isinstance(batch["x"], np.ndarray)
        np.testing.assert_array_equal(batch["x"], x[batch["sample_id"]])
        np.testing.assert_array_equal(batch["y"], i[batch["sample_id"]])
        seen.extend(batch["sample_id"].tolist())
    assert sorted(seen) == list(range(1000))


def test_write_batch_matches_write(env):
    a = np.arange(60, dtype=np.int32).reshape(20, 3)
    shardlock.pack_numpy(env.root / "p", {"a": a}, keyring=env.keyring, issuer_key=env.issuer, dataset_id="p")
    back = np.concatenate([b["a"] for b in env.loader(env.root / "p", output="numpy", shuffle="none", drop_last=False)])
    np.testing.assert_array_equal(back, a)


def test_writer_refuses_bad_input_and_an_aborted_writer_leaves_no_dataset(env):
    with pytest.raises(TypeError):
        with shardlock.Writer(env.root / "bad", keyring=env.keyring, issuer_key=env.issuer, dataset_id="bad") as w:
            w.write({"c": np.zeros(2, dtype=np.complex64)})
    with pytest.raises(RuntimeError):
        with shardlock.Writer(env.root / "abort", keyring=env.keyring, issuer_key=env.issuer, dataset_id="abort") as w:
            w.write({"a": np.zeros(3, dtype=np.uint8)})
            raise RuntimeError("boom")
    with pytest.raises(shardlock.ShardlockError):
        env.loader(env.root / "abort")
    with pytest.raises(shardlock.FormatError):
        with shardlock.Writer(env.root / "shape", keyring=env.keyring, issuer_key=env.issuer, dataset_id="shape") as w:
            w.write({"a": np.zeros(3, dtype=np.uint8)})
            w.write({"a": np.zeros(4, dtype=np.uint8)})
