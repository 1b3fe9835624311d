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


def test_writer_casts_losslessly_or_names_the_field_and_both_dtypes(env):
    """Security review finding 6: against a schema ``f32[2]``, float64, big-endian
    ``>f4`` and int32 arrays were all accepted and read back as garbage."""
    schema = {"x": ("f32", [2]), "n": ("i16", [])}
    good = np.array([1.5, -2.25], dtype=np.float32)
    with shardlock.Writer(env.root / "cast", keyring=env.keyring, issuer_key=env.issuer, dataset_id="cast", schema=schema) as w:
        w.write({"x": good, "n": np.int16(7)})
        w.write({"x": good.astype(">f4"), "n": np.int8(-3)})  # same values, other byte order; a narrower int
        w.write({"x": [0.5, 1.0], "n": 12})  # Python numbers that fit
        w.write_batch({"x": np.stack([good, good]).astype(">f4"), "n": np.array([1, 2], dtype=np.uint8)})
    batch = next(iter(env.loader(env.root / "cast", batch_size=5, shuffle="none", drop_last=False)))
    assert batch["x"].numpy().tolist() == [[1.5, -2.25], [1.5, -2.25], [0.5, 1.0], [1.5, -2.25], [1.5, -2.25]]
    assert batch["n"].numpy().tolist() == [7, -3, 12, 1, 2]
    bad = [
        ({"x": good.astype(np.float64), "n": 1}, "float64"),
        ({"x": np.array([1, 2], dtype=np.int32), "n": 1}, "int32"),
        ({"x": good, "n": 70000}, "int64"),
        ({"x": np.zeros(3, dtype=np.float32), "n": 1}, "shape [2]"),
    ]
    for sample, what in bad:
        with pytest.raises(shardlock.FormatError) as e:
            with shardlock.Writer(env.root / "bad-cast", keyring=env.keyring, issuer_key=env.issuer, dataset_id="b", schema=schema, force=True) as w:
                w.write(sample)
        msg = str(e.value)
        assert what in msg and ("'x'" in msg or "'n'" in msg), msg
    with pytest.raises(shardlock.FormatError, match="'x' expects f32"):
        with shardlock.Writer(env.root / "bad-batch", keyring=env.keyring, issuer_key=env.issuer, dataset_id="b", schema=schema) as w:
            w.write_batch({"x": np.zeros((2, 2), dtype=np.float64), "n": np.zeros(2, dtype=np.int16)})


def test_numpy_batch_views_are_read_only(env):
    """Security review finding 7: ``x[0, 0] = 42`` succeeded on a view of the locked
    buffer, and a bytes field's offsets could be rewritten."""
    with shardlock.Writer(env.root / "ro", keyring=env.keyring, issuer_key=env.issuer, dataset_id="ro") as w:
        for k in range(8):
            w.write({"x": np.full(4, k, dtype=np.int32), "b": b"abc" * k})
    batch = next(iter(env.loader(env.root / "ro", output="numpy", batch_size=4, shuffle="none")))
    values, offsets = batch["b"]
    for a in (batch["x"], values, offsets):
        assert not a.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 42
    assert offsets.tolist() == [0, 0, 3, 9, 18]


def test_writer_stores_scalars_with_shape_empty(env):
    """Issue 20 point 4: ``Writer`` stored Python/NumPy scalars with shape ``[1]``, so a
    label came back ``(B, 1)`` and ``cross_entropy`` failed; ``pack_numpy`` gave ``[]``."""
    import torch

    with shardlock.Writer(env.root / "sc", keyring=env.keyring, issuer_key=env.issuer, dataset_id="sc") as w:
        for k in range(8):
            w.write({"label": k % 3, "score": np.float32(k / 2), "x": np.arange(4, dtype=np.float32)})
    b = next(iter(env.loader(env.root / "sc", batch_size=4, shuffle="none")))
    assert b["label"].shape == (4,) and b["score"].shape == (4,) and b["x"].shape == (4, 4)
    assert b["label"].tolist() == [0, 1, 2, 0]
    logits = torch.zeros(4, 3)
    torch.nn.functional.cross_entropy(logits, b["label"])  # a (B, 1) target raised here


def test_scalars_bools_and_strings_come_back_as_training_input(env):
    import torch

    captions = [f"sample {i} – café" for i in range(50)]
    with shardlock.Writer(env.root / "mixed", keyring=env.keyring, issuer_key=env.issuer, dataset_id="mixed") as w:
        for i in range(50):
            w.write({"label": i, "flag": i % 3 == 0, "caption": captions[i], "score": np.float32(i / 2)})
    kw = dict(keyring=env.keyring, token=env.token("mixed"), trust=env.trust, batch_size=10, shuffle="none")
    b = next(iter(shardlock.Loader(env.root / "mixed", strings=["caption"], **kw)))
    assert b["label"].shape == (10,) and b["label"].dtype == torch.int64
    assert b["score"].shape == (10,)
    assert b["flag"].dtype == torch.bool and b["flag"].tolist() == [i % 3 == 0 for i in range(10)]
    assert b["caption"] == captions[:10]
    torch.nn.functional.cross_entropy(torch.zeros(10, 50), b["label"])  # a (B,) label, not (B, 1)
    n = next(iter(shardlock.Loader(env.root / "mixed", output="numpy", **kw)))
    assert n["flag"].dtype == np.bool_ and isinstance(n["caption"], tuple)  # bytes unless asked for str
    with pytest.raises(ValueError, match="not a field"):
        shardlock.Loader(env.root / "mixed", strings=["nope"], **kw)
    with shardlock.Writer(env.root / "b2", keyring=env.keyring, issuer_key=env.issuer, dataset_id="b2",
                          schema={"flag": ("bool", [])}) as w2:
        with pytest.raises(shardlock.FormatError, match="flag"):
            w2.write({"flag": 2})
        w2.write({"flag": True})


def test_packing_shows_progress_on_request_and_not_when_piped(env, capsys):
    arrays = {"x": np.zeros((3000, 64), dtype=np.float32)}
    kw = dict(keyring=env.keyring, issuer_key=env.issuer)
    assert shardlock.pack_numpy(env.root / "p1", arrays, dataset_id="p1", progress=True, **kw) == 3000
    err = capsys.readouterr().err
    assert "packing:" in err and "3000 samples" not in err.split("\r")[-1], err  # drawn, then cleared
    assert shardlock.pack_numpy(env.root / "p2", arrays, dataset_id="p2", **kw) == 3000
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    with shardlock.Writer(env.root / "p3", dataset_id="p3", progress=True, **kw) as w:
        for i in range(10):
            w.write({"y": np.int64(i)})
    assert "packing:" in capsys.readouterr().err
