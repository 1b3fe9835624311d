"""Streaming from S3-compatible object storage (a real ``moto_server``), mirroring
``loader-core/tests/s3.rs``: batches equal the local ones, the cache holds ciphertext
only, a second epoch comes from the cache, two processes share one cache directory, and
errors are typed and credential-free.

The server is started on a free port of 127.0.0.1 per module and killed at the end,
also when a test fails. Without ``moto_server`` the module is skipped with the reason,
unless ``SHARDLOCK_REQUIRE_S3=1`` (``make test``), where that is a failure.
"""

import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import shardlock

HERE = pathlib.Path(__file__).resolve().parent
ACCESS_KEY = "AKIDPYCANARY42"
SECRET_KEY = "SECRETPYCANARY-0a1b2c3d-never-log"
CANARY = b"CANARY-py-PLAINTEXT-NOT-IN-CACHE"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto() -> str:
    here = pathlib.Path(sys.executable).parent / "moto_server"
    if here.exists():
        return str(here)
    found = shutil.which("moto_server")
    if found:
        return found
    if os.environ.get("SHARDLOCK_REQUIRE_S3") == "1":
        pytest.fail("moto_server not found (SHARDLOCK_REQUIRE_S3=1): run `make setup`")
    pytest.skip("moto_server not installed (pip install 'moto[server]')")
    raise AssertionError  # unreachable


@pytest.fixture(scope="module")
def server():
    exe = _moto()
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def _upload(endpoint: str, local: pathlib.Path, bucket: str, prefix: str) -> str:
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
    )
    s3.create_bucket(Bucket=bucket)
    for f in sorted(local.iterdir()):
        if f.name != "manifest.json":
            s3.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    s3.upload_file(str(local / "manifest.json"), bucket, f"{prefix}/manifest.json")
    return f"s3://{bucket}/{prefix}"


def _opts(endpoint: str, cache: pathlib.Path, **kw):
    o = {
        "endpoint": endpoint,
        "region": "us-east-1",
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "cache_dir": cache,
        "timeout": "6s",
        "stall_timeout": "2s",
    }
    o.update(kw)
    return o


@pytest.fixture
def remote(env, server):
    n = 600
    tag = np.frombuffer(CANARY * 8, dtype=np.uint8)
    x = np.stack([np.concatenate([tag, np.full(64, i % 251, dtype=np.uint8)]) for i in range(n)])
    y = np.arange(n, dtype=np.int64)
    local = env.pack("pyds", {"x": x, "y": y}, shard_size=40_000)
    bucket = f"py-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    url = _upload(server, local, bucket, "data/pyds")
    return local, url, x, y


def _epoch(loader):
    xs, ys = [], []
    for b in loader:
        xs.append(np.array(b["x"]))
        ys.append(np.array(b["y"]))
    return np.concatenate(xs), np.concatenate(ys)


def _assert_ciphertext_only(cache: pathlib.Path) -> None:
    for p in cache.iterdir():
        data = p.read_bytes()
        assert CANARY not in data, f"plaintext in cache file {p.name}"
        assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data


def test_streams_like_local_and_caches_ciphertext_only(env, server, remote):
    local, url, x, y = remote
    cache = env.root / "cache"
    kw = dict(dataset="pyds", shuffle="window", seed=3, output="numpy", batch_size=16)
    loader = env.loader(url, storage_options=_opts(server, cache), **kw)
    for epoch in range(2):  # cold, then from the cache
        local_loader = env.loader(local, **kw)
        local_loader.set_epoch(epoch)
        lx, ly = _epoch(local_loader)
        rx, ry = _epoch(loader)
        assert np.array_equal(ry, ly), f"epoch {epoch}: {ry[:20]} vs {ly[:20]}"
        assert np.array_equal(rx, lx)
    assert len(ry) > 0 and set(ry.tolist()) <= set(y.tolist())
    del loader
    names = sorted(p.name for p in cache.iterdir())
    assert any(n.endswith(".slk") for n in names)
    _assert_ciphertext_only(cache)


@pytest.mark.parametrize("range_reads", ["always", "auto"])
def test_global_shuffle_by_ranged_reads_equals_local(env, server, remote, range_reads):
    """Global shuffle reading just the needed chunks by ranged GETs (forced, or chosen by
    `auto` because the dataset does not fit in `cache_bytes`): the same batches as from
    the local directory, and nothing in the cache."""
    local, url, _, _ = remote
    cache = env.root / "ranged-cache"
    shard_bytes = max(p.stat().st_size for p in local.glob("*.slk"))
    opts = _opts(server, cache, range_reads=range_reads, cache_bytes=str(shard_bytes))
    kw = dict(dataset="pyds", shuffle="global", seed=11, output="numpy", batch_size=16)
    loader = env.loader(url, storage_options=opts, **kw)
    local_loader = env.loader(local, **kw)
    for epoch in range(2):
        lx, ly = _epoch(local_loader)
        rx, ry = _epoch(loader)
        assert np.array_equal(ry, ly), f"epoch {epoch}: {ry[:20]} vs {ly[:20]}"
        assert np.array_equal(rx, lx)
    del loader
    cached = sorted(p.name for p in cache.glob("*.slk"))
    assert cached == [], f"ranged reads downloaded whole shards: {cached}"
    if cache.exists():
        _assert_ciphertext_only(cache)


def _share_cache_child(spec_json: str) -> None:
    """One process of test_processes_share_one_cache_dir (run as its own interpreter):
    once every process is ready, streams one epoch and saves its batches to spec["out"]."""
    spec = json.loads(spec_json)
    barrier = pathlib.Path(spec["barrier"])
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < spec["processes"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the other processes did not start within 60 s")
        time.sleep(0.01)
    x, y = _epoch(shardlock.Loader(spec["url"], **spec["loader"]))
    np.savez(spec["out"], x=x, y=y)


@pytest.mark.parametrize("world", [1, 2])
def test_processes_share_one_cache_dir(env, server, remote, world):
    """Two OS processes (ranks on one node: both rank 0 of 1, or ranks 0 and 1 of 2)
    stream the same s3:// dataset at the same time through one cache directory that does
    not exist yet. Each gets the batches a local-directory loader yields for its rank; the
    cache ends with one complete, verified `<sha256>.slk` per shard read, nothing partial
    and no plaintext."""
    local, url, _, _ = remote
    cache = env.root / "shared-cache"
    barrier = env.root / "barrier"
    barrier.mkdir()
    kw = {"shuffle": "window", "seed": 3, "output": "numpy", "batch_size": 16, "world_size": world}
    token = env.token("pyds", name="shared.token")
    options = {k: str(v) for k, v in _opts(server, cache, timeout="20s").items()}
    ranks = [0, 1] if world == 2 else [0, 0]
    procs = []
    try:
        for i, rank in enumerate(ranks):
            spec = {
                "url": url,
                "barrier": str(barrier),
                "processes": len(ranks),
                "out": str(env.root / f"process{i}.npz"),
                "loader": dict(kw, rank=rank, keyring=str(env.keyring), token=str(token), trust=str(env.trust), storage_options=options),
            }
            code = "import sys, test_s3; test_s3._share_cache_child(sys.argv[1])"
            procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], cwd=HERE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 180
        for i, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {i} sharing the cache did not finish within 180 s")
            assert p.returncode == 0, f"process {i} exited with {p.returncode}: {err[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    read = []
    for i, rank in enumerate(ranks):
        lx, ly = _epoch(env.loader(local, dataset="pyds", token=token, rank=rank, **kw))
        got = np.load(env.root / f"process{i}.npz")
        assert np.array_equal(got["y"], ly), f"process {i} (rank {rank} of {world}): ids {got['y'][:20]} vs local {ly[:20]}"
        assert np.array_equal(got["x"], lx), f"process {i} (rank {rank} of {world}): bytes differ from the local batches"
        read.append(got["y"])

    shards = json.loads((local / "manifest.json").read_text())["body"]["shards"]
    shard_end = np.cumsum([s["records"] for s in shards])  # y is the sample index
    needed = {f"{shards[j]['sha256']}.slk" for j in np.unique(np.searchsorted(shard_end, np.concatenate(read), side="right"))}
    by_name = {f"{s['sha256']}.slk": s for s in shards}
    names = {p.name for p in cache.iterdir()}
    slk = {n for n in names if n.endswith(".slk")}
    assert needed <= slk <= set(by_name), f"shards read {sorted(needed)}, cached {sorted(slk)}"
    assert all(n.endswith(".lock") for n in names - slk), f"left in the cache: {sorted(names - slk)}"
    for name in slk:
        data = (cache / name).read_bytes()
        assert len(data) == by_name[name]["file_bytes"], f"{name}: {len(data)} bytes"
        assert hashlib.sha256(data).hexdigest() == by_name[name]["sha256"], f"{name}: content is not the shard"
    _assert_ciphertext_only(cache)


def test_unreachable_store_raises_remote_error_without_credentials(env, remote):
    _, url, _, _ = remote
    dead = f"http://127.0.0.1:{_free_port()}"
    t = time.monotonic()
    with pytest.raises(shardlock.RemoteError) as e:
        env.loader(url, dataset="pyds", storage_options=_opts(dead, env.root / "c", timeout="2s"))
    assert time.monotonic() - t < 30
    assert e.value.kind == "unavailable" and e.value.url.endswith("manifest.json")
    assert SECRET_KEY not in str(e.value) and ACCESS_KEY not in str(e.value)
    assert isinstance(e.value, shardlock.ShardlockError)


def test_bad_option_is_a_value_error_that_does_not_echo_it(env, remote):
    _, url, _, _ = remote
    with pytest.raises(ValueError) as e:
        env.loader(url, dataset="pyds", storage_options={"timeout": SECRET_KEY})
    assert SECRET_KEY not in str(e.value)
    with pytest.raises(ValueError):
        env.loader(url, dataset="pyds", storage_options={"no_such_option": "1"})


def test_forked_child_drops_an_s3_loader_without_hanging(env, server, remote):
    """The loader's tokio runtime threads stay in the parent; a child that frees its copy
    of the loader must neither touch them nor wait for them."""
    _, url, _, _ = remote
    loader = env.loader(url, dataset="pyds", output="numpy", storage_options=_opts(server, env.root / "fork-cache"))
    next(iter(loader))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            del loader
            import gc

            gc.collect()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("a forked child hung freeing an s3:// loader")


def test_a_process_without_the_keyring_streams_s3_through_the_key_service(env, server, remote, keyd):
    """No KEK material in the workload: the DEKs come from the service, the shards from S3."""
    local, url, x, y = remote
    svc, ca, audit = keyd
    kw = dict(dataset="pyds", shuffle="window", seed=5, output="numpy", batch_size=16, drop_last=False)
    token = env.token("pyds")
    loader = shardlock.Loader(url, keyring=svc, ca_cert=ca, token=token, trust=env.trust,
                              storage_options=_opts(server, env.root / "cache"),
                              **{k: v for k, v in kw.items() if k != "dataset"})
    for epoch in range(2):
        local_loader = env.loader(local, **kw)
        local_loader.set_epoch(epoch)
        loader.set_epoch(epoch)
        lx, ly = _epoch(local_loader)
        rx, ry = _epoch(loader)
        assert (ry == ly).all() and (rx == lx).all(), f"epoch {epoch}"
        assert sorted(ry.tolist()) == list(range(len(y)))
    released = [json.loads(r) for r in audit.read_text().splitlines()]
    released = [r for r in released if r["event"] == "key_release" and r["decision"] == "allow"]
    shards = len(json.loads((local / "manifest.json").read_text())["body"]["shards"])
    assert len(released) == 2 * shards, "each shard's key released by the service once per epoch"


def test_parts_written_straight_to_s3_assemble_there(env, server):
    """Two workers write their parts to s3:// (issuer public key only), assemble
    verifies them in the bucket and uploads the signed manifest last; a missing part is
    a gap assemble refuses. No staging is left behind."""
    import boto3
    import tempfile

    bucket = f"parts-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    s3 = boto3.client("s3", endpoint_url=server, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                      aws_secret_access_key=SECRET_KEY)
    s3.create_bucket(Bucket=bucket)
    store = {k: v for k, v in _opts(server, env.root / "unused").items() if k != "cache_dir"}
    x = np.arange(64 * 300, dtype=np.float32).reshape(64, 300)

    def part(url, rows, first, count):
        with shardlock.Writer(url, keyring=env.keyring, issuer_key=env.trust, dataset_id="parts",
                              schema={"x": ("f32", (300,))}, shard_size=16 * 1200, part=(first, count),
                              storage_options=store) as w:
            for r in rows:
                w.write({"x": x[r]})

    url = f"s3://{bucket}/ds"
    part(url, range(0, 32), 0, 2)
    part(url, range(32, 64), 2, None)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert "ds/manifest.json" not in keys and "ds/part-00000.json" in keys and "ds/shard-00003.slk" in keys
    assert shardlock.assemble(url, issuer_key=env.issuer, keyring=env.keyring, storage_options=store) == (64, 4)
    env.token("parts")
    loader = env.loader(url, dataset="parts", batch_size=8, shuffle="none", storage_options=_opts(server, env.root / "pc"))
    got = np.concatenate([b["x"].numpy() for b in loader])
    assert np.array_equal(got, x)
    gap = f"s3://{bucket}/gap"
    part(gap, range(32, 64), 2, None)
    with pytest.raises(shardlock.FormatError, match="no part has shard 0"):
        shardlock.assemble(gap, issuer_key=env.issuer, keyring=env.keyring, storage_options=store)
    left = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(("shardlock-part-", "shardlock-assemble-"))
            and f"-{os.getpid()}-" in n]
    assert left == []
    with pytest.raises(ValueError, match="only a part"):
        shardlock.Writer(url + "2", keyring=env.keyring, issuer_key=env.issuer, dataset_id="parts",
                         schema={"x": ("f32", (300,))}, storage_options=store)
