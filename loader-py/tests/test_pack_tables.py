"""shardlock.pack from Parquet, Arrow IPC, pyarrow tables and Hugging Face datasets:
every field read back exactly as pyarrow reads the source, and bad input is a typed
error naming file, row group, row and column, with no dataset left behind (#17)."""

import json
import os
import pathlib

import numpy as np
import pytest

import shardlock

pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (make test installs it)")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (make test installs it)")

N = 700


def table(n=N, start=0):
    i = np.arange(start, start + n)
    return pa.table({
        "label": pa.array(i, pa.int64()),
        "small": pa.array((i % 200).astype(np.uint8)),
        "score": pa.array(i / 7, pa.float32()),
        "half": pa.array((i % 50).astype(np.float16)),
        "flag": pa.array(i % 3 == 0),
        "vec": pa.FixedSizeListArray.from_arrays(pa.array((np.repeat(i, 3) * np.tile([1, 2, 3], n)).astype(np.float32)), 3),
        "img": pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(pa.array(np.tile(np.arange(8, dtype=np.uint16), n)), 4), 2),
        "blob": pa.array([bytes([k % 256]) * (k % 37) for k in i], pa.binary()),
        "text": pa.array([f"row {k} – ünïcode" + "x" * (40000 if k == 5 else 0) for k in i], pa.string()),
    })


def read_all(env, path, dataset):
    loader = shardlock.Loader(path, keyring=env.keyring, token=env.token(dataset, f"{dataset}.token"), trust=env.trust,
                              batch_size=64, shuffle="none", drop_last=False, output="numpy", strings=["text"])
    out = {}
    for b in loader:
        for k, v in b.items():
            if isinstance(v, tuple):  # bytes: (values, offsets)
                vals, offs = v
                v = [bytes(vals[offs[j]:offs[j + 1]]) for j in range(len(offs) - 1)]
            out.setdefault(k, []).extend(list(v))
    return out


def check_equal(got, t):
    assert list(got) == t.column_names
    for name in t.column_names:
        want = t.column(name).to_pylist()
        have = got[name]
        if name in ("vec", "img", "score", "half"):
            np.testing.assert_array_equal(np.array(have, dtype=np.float64), np.array(want, dtype=np.float64), name)
        else:
            assert [x.tolist() if hasattr(x, "tolist") else x for x in have] == want, name


def pack(env, source, dataset, **kw):
    return shardlock.pack(source, env.root / dataset, keyring=env.keyring, issuer_key=env.issuer, dataset_id=dataset,
                          shard_size="64k", **kw)


def test_parquet_directory_arrow_ipc_and_tables_round_trip_exactly(env):
    t = table()
    d = env.root / "pq"
    d.mkdir()
    pq.write_table(t.slice(0, 300), d / "a.parquet", row_group_size=100)
    pq.write_table(t.slice(300), d / "b.parquet", row_group_size=128)
    (d / ".hidden.parquet").write_bytes(b"not parquet")  # dot-files are skipped
    assert pack(env, d, "from-parquet") == N
    check_equal(read_all(env, env.root / "from-parquet", "from-parquet"), t)
    with pa.OSFile(str(env.root / "t.arrow"), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t, max_chunksize=256)
    assert pack(env, env.root / "t.arrow", "from-ipc") == N
    check_equal(read_all(env, env.root / "from-ipc", "from-ipc"), t)
    assert pack(env, t.to_reader(max_chunksize=100), "from-reader") == N
    check_equal(read_all(env, env.root / "from-reader", "from-reader"), t)
    # columns= picks and orders.
    assert pack(env, t, "picked", columns=["text", "label"]) == N
    got = read_all(env, env.root / "picked", "picked")
    assert list(got) == ["text", "label"] and got["label"] == list(range(N))


def test_fixed_shape_tensor_extension_keeps_its_shape(env):
    ty = pa.fixed_shape_tensor(pa.float32(), [2, 3])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(60, dtype=np.float32)), 6)
    t = pa.table({"t": pa.ExtensionArray.from_storage(ty, storage)})
    assert pack(env, t, "tensor") == 10
    b = next(iter(shardlock.Loader(env.root / "tensor", keyring=env.keyring, token=env.token("tensor"),
                                   trust=env.trust, batch_size=10, shuffle="none")))
    assert tuple(b["t"].shape) == (10, 2, 3) and b["t"].flatten().tolist() == list(range(60))


def test_hugging_face_datasets_round_trip(env):
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (make test installs it)")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    rows = {"label": list(range(500)), "text": [f"sentence {i}" for i in range(500)],
            "emb": [[float(i), float(-i)] for i in range(500)]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({
        "label": datasets.Value("int32"), "text": datasets.Value("string"),
        "emb": getattr(datasets, "List", datasets.Sequence)(datasets.Value("float32"), length=2)}))
    ds.save_to_disk(str(env.root / "hf"))
    ds = datasets.load_from_disk(str(env.root / "hf"))
    assert pack(env, ds.shuffle(seed=1), "hf") == 500  # an indices mapping is followed
    got = read_all(env, env.root / "hf", "hf")
    order = ds.shuffle(seed=1)["label"]
    assert [int(x) for x in got["label"]] == order
    assert got["text"] == [f"sentence {i}" for i in order]
    assert [list(map(float, e)) for e in got["emb"]] == [[float(i), float(-i)] for i in order]
    it = ds.to_iterable_dataset(num_shards=2)
    assert pack(env, it, "hf-iter") == 500
    assert sorted(int(x) for x in read_all(env, env.root / "hf-iter", "hf-iter")["label"]) == list(range(500))


def test_bad_input_is_a_typed_error_naming_where_and_leaves_no_dataset(env):
    d = env.root / "bad"
    d.mkdir()
    pq.write_table(pa.table({"x": pa.array([1, 2, None, 4], pa.int64())}), d / "nulls.parquet", row_group_size=2)
    with pytest.raises(shardlock.FormatError, match=r"nulls.parquet, row group 1, row 2, column 'x': null"):
        pack(env, d, "nulls")
    assert not (env.root / "nulls" / "manifest.json").exists()
    drift = env.root / "drift"
    drift.mkdir()
    pq.write_table(pa.table({"x": pa.array([1], pa.int64())}), drift / "a.parquet")
    pq.write_table(pa.table({"x": pa.array([1.5], pa.float64())}), drift / "b.parquet")
    with pytest.raises(shardlock.FormatError, match=r"b.parquet.*differs"):
        pack(env, drift, "drifted")
    assert not (env.root / "drifted" / "manifest.json").exists()
    nested = pa.table({"tokens": pa.array([[[1], [2]], [[3]]], pa.list_(pa.list_(pa.int32())))})
    with pytest.raises(shardlock.FormatError, match=r"column 'tokens'.*nested lists are not supported"):
        pack(env, nested, "nested")
    holes = pa.table({"tokens": pa.array([[1, 2], [3, None, 5]], pa.list_(pa.int32()))})
    with pytest.raises(shardlock.FormatError, match=r"row 1, column 'tokens': null element in a list"):
        pack(env, holes, "holes")
    assert not (env.root / "holes" / "manifest.json").exists()
    garbage = env.root / "garbage.parquet"
    garbage.write_bytes(b"PAR1 nope")
    with pytest.raises(shardlock.FormatError, match="garbage.parquet: not a readable Parquet file"):
        pack(env, garbage, "garbage")
    with pytest.raises(FileNotFoundError):
        pack(env, env.root / "missing.parquet", "missing")
    with pytest.raises(TypeError, match="shardlock.pack takes"):
        pack(env, 42, "int")


def test_token_lists_become_list_fields_read_back_as_values_and_element_offsets(env):
    rng = np.random.default_rng(9)
    docs = [rng.integers(0, 50_000, int(n), dtype=np.uint32) for n in rng.integers(0, 300, 400)]
    docs[3] = np.arange(20_000, dtype=np.uint32)  # one document spanning several 16 KiB chunks
    docs[4] = np.array([], dtype=np.uint32)
    t = pa.table({"tokens": pa.array([d.tolist() for d in docs], pa.list_(pa.uint32())),
                  "big": pa.array([d.astype(np.int64).tolist()[:5] for d in docs], pa.large_list(pa.int64())),
                  "id": pa.array(np.arange(400), pa.int64())})
    pq.write_table(t, env.root / "docs.parquet", row_group_size=128)
    assert pack(env, env.root / "docs.parquet", "docs") == 400
    loader = shardlock.Loader(env.root / "docs", keyring=env.keyring, token=env.token("docs"), trust=env.trust,
                              batch_size=64, shuffle="none", drop_last=False, output="numpy")
    got, big = [], []
    for b in loader:
        vals, offs = b["tokens"]
        assert vals.dtype == np.uint32 and offs.dtype == np.int64 and offs[0] == 0 and offs[-1] == len(vals)
        got += [vals[offs[j]:offs[j + 1]] for j in range(len(offs) - 1)]
        bv, bo = b["big"]
        assert bv.dtype == np.int64
        big += [bv[bo[j]:bo[j + 1]].tolist() for j in range(len(bo) - 1)]
    assert len(got) == 400 and all(np.array_equal(g, d) for g, d in zip(got, docs))
    assert big == t.column("big").to_pylist()
    torch = pytest.importorskip("torch")
    tl = shardlock.Loader(env.root / "docs", keyring=env.keyring, token=env.token("docs"), trust=env.trust,
                          batch_size=8, shuffle="none")
    vals, offs = next(iter(tl))["tokens"]
    assert isinstance(vals, torch.Tensor) and vals.dtype == torch.uint32 and offs.dtype == torch.int64
    nt = torch.nested.nested_tensor_from_jagged(vals.to(torch.int64), offs)
    assert [x.tolist() for x in nt.unbind()] == [d.tolist() for d in docs[:8]]


def test_compressed_fields_read_back_as_the_source_and_take_less_space(env):
    t = table()
    columns = ["text", "blob", "img", "label"]
    assert pack(env, t, "plain-cols", columns=columns) == N
    assert pack(env, t, "zstd-cols", columns=columns,
                compress={"text": "zstd", "blob": "zstd:9", "img": "zstd:1"}) == N
    check_equal(read_all(env, env.root / "zstd-cols", "zstd-cols"), t.select(columns))

    def size(name):
        return sum(f.stat().st_size for f in (env.root / name).glob("*.slk"))

    # Small values: each frame costs ~10 bytes, so the gain is the 40 KB text value and the rest.
    assert size("zstd-cols") < 0.8 * size("plain-cols"), (size("zstd-cols"), size("plain-cols"))
    body = json.loads((env.root / "zstd-cols" / "manifest.json").read_text())["body"]
    stored = {f["name"]: f.get("compress") for f in body["schema"]["fields"]}
    assert stored == {"text": "zstd", "blob": "zstd", "img": "zstd", "label": None}
    for bad, match in [({"nope": "zstd"}, "no field"), ({"text": "lz4"}, "unknown codec"),
                       ({"text": "zstd:40"}, "out of range")]:
        with pytest.raises(ValueError, match=match):
            pack(env, t, "bad-compress", columns=columns, compress=bad)
        assert not (env.root / "bad-compress" / "manifest.json").exists()


def test_writer_list_fields(env):
    with shardlock.Writer(env.root / "w", keyring=env.keyring, issuer_key=env.issuer, dataset_id="w",
                          schema={"tok": "list<i32>", "y": ("i64", ())}) as w:
        for i in range(5):
            w.write({"tok": list(range(i)), "y": i})
    got = []
    for b in env.loader(env.root / "w", dataset="w", batch_size=5, shuffle="none", output="numpy"):
        vals, offs = b["tok"]
        got += [vals[offs[j]:offs[j + 1]].tolist() for j in range(len(offs) - 1)]
    assert got == [list(range(i)) for i in range(5)]
    with pytest.raises(ValueError, match="names no dtype"):
        shardlock.Writer(env.root / "w2", keyring=env.keyring, issuer_key=env.issuer, dataset_id="w2",
                         schema={"tok": "list<int>"})
    with shardlock.Writer(env.root / "w3", keyring=env.keyring, issuer_key=env.issuer, dataset_id="w3",
                          schema={"tok": "list<u16>"}) as w:
        with pytest.raises(shardlock.FormatError, match="1-D array"):
            w.write({"tok": np.zeros((2, 2), dtype=np.uint16)})
        with pytest.raises(shardlock.FormatError, match="does not convert"):
            w.write({"tok": np.array([70_000], dtype=np.int64)})
        w.write({"tok": [1, 2]})


def test_empty_batches_are_skipped_not_failed(env):
    schema = pa.schema([("b", pa.binary()), ("x", pa.int32())])
    empty = pa.record_batch([pa.array([], pa.binary()), pa.array([], pa.int32())], schema=schema)
    full = pa.record_batch([pa.array([b"a", b""]), pa.array([1, 2], pa.int32())], schema=schema)
    assert pack(env, pa.RecordBatchReader.from_batches(schema, [empty, full, empty]), "with-empty") == 2
    with pytest.raises(shardlock.FormatError, match="no batches"):
        pack(env, pa.RecordBatchReader.from_batches(schema, []), "no-batches")


def write_tar(path, samples):
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_tars_group_members_by_key(env):
    rng = np.random.default_rng(3)
    samples = [(f"train/{i:06d}", {"jpg": rng.bytes(int(rng.integers(0, 30000))), "cls": f"{i % 10}\n".encode(),
                                   "json": f'{{"i": {i}}}'.encode()}) for i in range(300)]
    d = env.root / "wds"
    d.mkdir()
    write_tar(d / "shard-000.tar", samples[:120])
    write_tar(d / "shard-001.tar", samples[120:])
    assert pack(env, d, "wds", parse={"cls": "i64"}) == 300
    loader = shardlock.Loader(env.root / "wds", keyring=env.keyring, token=env.token("wds"), trust=env.trust,
                              batch_size=50, shuffle="none", drop_last=False, output="numpy", strings=["json"])
    assert loader.fields == ["cls", "jpg", "json"]
    got = {"cls": [], "jpg": [], "json": []}
    for b in loader:
        got["cls"] += b["cls"].tolist()
        vals, offs = b["jpg"]
        got["jpg"] += [bytes(vals[offs[j]:offs[j + 1]]) for j in range(len(offs) - 1)]
        got["json"] += b["json"]
    assert got["cls"] == [i % 10 for i in range(300)]
    assert got["jpg"] == [m["jpg"] for _, m in samples]
    assert got["json"] == [m["json"].decode() for _, m in samples]


def test_webdataset_bad_input_names_the_tar_and_sample(env):
    d = env.root / "bad-wds"
    d.mkdir()
    write_tar(d / "a.tar", [("k1", {"jpg": b"x", "cls": b"1"}), ("k2", {"jpg": b"y"})])
    with pytest.raises(shardlock.FormatError, match=r"a.tar: sample .k2.: has extensions \[.jpg.\]"):
        pack(env, d, "bad-wds-out")
    assert not (env.root / "bad-wds-out" / "manifest.json").exists()
    write_tar(d / "a.tar", [("k1", {"jpg": b"x", "cls": b"one"})])
    with pytest.raises(shardlock.FormatError, match=r"sample .k1.: .cls \(3 bytes\) is not integer text") as e:
        pack(env, d, "bad-wds-out2", parse={"cls": "i64"})
    assert "one" not in str(e.value)  # plaintext never goes into an error
    (d / "notes.txt").write_text("not a tar")
    with pytest.raises(shardlock.FormatError, match=r"1 .tar file\(s\) and 1 other file\(s\)"):
        pack(env, d, "mixed")  # never silently left out
    (env.root / "broken.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(shardlock.FormatError, match="broken.tar"):
        pack(env, env.root / "broken.tar", "broken")


def test_image_folders_get_image_bytes_and_sorted_class_labels(env):
    rng = np.random.default_rng(5)
    root = env.root / "imgs"
    want = []
    for c in ("zebra", "cat", "dog"):
        (root / c / "sub").mkdir(parents=True)
        for k in range(7):
            data = rng.bytes(int(rng.integers(1, 5000)))
            sub = "sub/" if k % 3 == 0 else ""
            (root / c / f"{sub}{k:03d}.JPG").write_bytes(data)
        (root / c / "notes.txt").write_text("not an image")
        (root / c / ".DS_Store").write_bytes(b"x")
    (root / "empty").mkdir()
    with pytest.raises(shardlock.FormatError, match="class directory .empty. holds no image file"):
        pack(env, root, "imgs")
    (root / "empty").rmdir()
    classes = shardlock.image_folder_classes(root)
    assert classes == ["cat", "dog", "zebra"]
    for label, c in enumerate(classes):
        for dirpath, dirs, files in sorted(os.walk(root / c)):
            dirs.sort()
            want += [((pathlib.Path(dirpath) / f).read_bytes(), label) for f in sorted(files) if f.endswith(".JPG")]
    assert pack(env, root, "imgs") == 21
    loader = shardlock.Loader(env.root / "imgs", keyring=env.keyring, token=env.token("imgs"), trust=env.trust,
                              batch_size=5, shuffle="none", drop_last=False, output="numpy")
    assert loader.classes == ["cat", "dog", "zebra"], "the class names are signed with the manifest"
    got = []
    for b in loader:
        vals, offs = b["image"]
        got += [(bytes(vals[offs[j]:offs[j + 1]]), int(b["label"][j])) for j in range(len(b["label"]))]
    assert got == want


def test_writer_metadata_is_signed_and_read_back(env):
    with shardlock.Writer(env.root / "m", keyring=env.keyring, issuer_key=env.issuer, dataset_id="m",
                          metadata={"classes": ["a", "b"], "license": "CC-BY-4.0", "stats": {"mean": 0.5}}) as w:
        w.write({"y": np.int64(1)})
    loader = shardlock.Loader(env.root / "m", keyring=env.keyring, token=env.token("m"), trust=env.trust, batch_size=1)
    assert loader.metadata == {"classes": ["a", "b"], "license": "CC-BY-4.0", "stats": {"mean": 0.5}}
    assert loader.classes == ["a", "b"]
    with pytest.raises(ValueError, match="list of class names"):
        shardlock.Writer(env.root / "bad", keyring=env.keyring, issuer_key=env.issuer, dataset_id="bad",
                         metadata={"classes": "a,b"}, schema={"y": ("i64", ())})
    with pytest.raises(ValueError, match="JSON values"):
        shardlock.Writer(env.root / "bad2", keyring=env.keyring, issuer_key=env.issuer, dataset_id="bad2",
                         metadata={"when": object()})
    plain = env.pack("plain", {"y": np.arange(3, dtype=np.int64)})
    assert env.loader(plain, batch_size=1).classes is None


def test_parts_packed_without_the_issuer_key_assemble_into_one_dataset(env):
    """Two workers (processes or machines in real use) each pack a shard range with the
    issuer's public key only; assemble verifies the parts and signs."""
    out = env.root / "parted"
    rows = np.arange(60, dtype=np.int64)
    # 8-byte rows in 80-byte shards: 10 rows per shard, so rows 0..30 fill shards 0..2.
    for first, count, part_rows in ((0, 3, rows[:30]), (3, None, rows[30:])):
        with shardlock.Writer(out, keyring=env.keyring, issuer_key=env.trust, dataset_id="parted",
                              schema={"y": ("i64", ())}, shard_size=80, part=(first, count)) as w:
            for r in part_rows:
                w.write({"y": r})
    with pytest.raises(shardlock.FormatError):
        shardlock.Loader(out, keyring=env.keyring, token=env.token("parted"), trust=env.trust, batch_size=4)
    assert shardlock.assemble(out, issuer_key=env.issuer, keyring=env.keyring) == (60, 6)
    loader = env.loader(out, batch_size=6, shuffle="none", output="numpy")
    assert np.concatenate([b["y"] for b in loader]).tolist() == rows.tolist()
    with pytest.raises(ValueError, match="assembled"):
        shardlock.assemble(out, issuer_key=env.issuer, keyring=env.keyring)
