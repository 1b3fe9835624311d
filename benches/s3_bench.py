"""Streaming from S3-compatible object storage vs local disk, shardlock and litdata side
by side in one run.

Starts ``moto_server`` on a free port of 127.0.0.1 and writes ``--gib`` GiB of random
``--sample-kib`` KiB uint8 samples (the first 8 bytes of each hold its index:
``benches/compare/common.py``). Then:

1. shardlock: packs them, uploads the dataset with ``shardlock upload`` and runs
   ``shardlock bench --json`` twice in a row, 2 epochs each: on the local directory (page
   cache warm after packing), then on ``s3://`` with an empty cache directory (epoch 0 is
   cold: downloads; epoch 1 reads the cache);
2. litdata: writes the same samples with ``litdata.optimize()`` (64 MB chunks, as
   ``benches/compare/prepare.py`` does), plaintext and with litdata's ``FernetEncryption``
   (chunk level), uploads each output directory with boto3 under its own prefix of the
   same bucket, and streams it with ``litdata.StreamingDataset("s3://...", cache_dir=<an
   empty directory>)`` and a ``StreamingDataLoader`` (same batch size, shuffle on,
   ``num_workers=0``) for 2 epochs: epoch 0 downloads, epoch 1 reads litdata's cache.
   Every litdata epoch must yield every sample exactly once (a few rows of ~50 batches
   are compared with the plaintext byte for byte); otherwise the script exits 1.

3. with ``--s3s-fs PATH``: uploads the shardlock dataset to an ``s3s-fs`` server too and
   runs one cold ``global``-shuffle epoch twice with ``--cache-bytes`` a quarter of the
   dataset: whole shards (``--range-reads never``) and ranged reads of just the needed
   chunks (``auto`` picks them); "GB moved" is what the loader received from the
   server (``remote_bytes``), "cache MB" what the cache holds at the end and "peak MB"
   the most it held during the epoch (sampled every 0.1 s). moto is not used for this: it reads the whole object
   for every ranged GET.

It prints one table (first-batch latency, GB/s of sample bytes delivered, samples per
epoch) and one JSON line with everything. First batch: from the start of the epoch's
iteration, after the manifest (shardlock) or ``index.json`` (litdata) was fetched.

    python benches/s3_bench.py --shardlock target/release/shardlock --gib 2

litdata (``bash benches/compare/install.sh .venv``) downloads chunks through obstore with
client options it fixes without ``allow_http``, so against a plain ``http://`` endpoint
every chunk GET fails ("builder error", BadScheme); for the loopback server the script
adds ``allow_http`` to those options. A litdata variant that cannot run prints
``litdata: skipped: REASON`` (or ``litdata-fernet: skipped: ...``) and the rest goes on;
``--skip-litdata`` leaves litdata out.

The server is killed at the end, also on errors. Needs ``moto[server]`` in the venv
(``make setup``) and a release build of the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "compare"))
from common import Shape, SpotCheck, plaintext_path, write_plaintext  # noqa: E402

BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}
#: The litdata formats streamed, each under s3://bench/<name>.
LITDATA_VARIANTS = ("litdata", "litdata-fernet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"`{' '.join(cmd)}` failed (exit {out.returncode}): {out.stderr.strip()}")
    return out.stdout


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def output_to(log: pathlib.Path) -> Iterator[None]:
    """Sends stdout and stderr of this process and of the processes it starts to `log`
    (litdata.optimize() prints the progress of every worker)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)


def why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def shardlock_rows(exe: str, work: pathlib.Path, npy: pathlib.Path, a: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Packs `npy`, uploads the dataset to s3://bench/ds and benches it locally and from s3://."""
    ds = work / "ds"
    for f in ("keyring.json", "issuer.key", "issuer.key.pub", "job.token"):
        (work / f).unlink(missing_ok=True)
    run([exe, "keygen", "kek", "--out", str(work / "keyring.json")], env)
    run([exe, "keygen", "issuer", "--out", str(work / "issuer.key")], env)
    run(
        [exe, "pack", "--keyring", str(work / "keyring.json"), "--issuer-key", str(work / "issuer.key"),
         "--dataset-id", "bench/s3", "--out", str(ds), "--shard-size", a.shard_size, "--force", str(npy)],
        env,
    )
    run([exe, "token", "issue", "--issuer-key", str(work / "issuer.key"), "--dataset", "bench/s3",
         "--principal", "bench", "--ttl", "2h", "--out", str(work / "job.token")], env)
    t = time.monotonic()
    run([exe, "upload", str(ds), f"s3://{BUCKET}/ds", "--trust", str(work / "issuer.key.pub")], env)
    upload_s = time.monotonic() - t

    common = ["--keyring", str(work / "keyring.json"), "--token", str(work / "job.token"),
              "--trust", str(work / "issuer.key.pub"), "--batch-size", str(a.batch_size),
              "--shuffle", "window", "--epochs", "2", "--json"]
    local = json.loads(run([exe, "bench", str(ds), *common], env))
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    t = time.monotonic()
    remote = json.loads(run([exe, "bench", f"s3://{BUCKET}/ds", "--cache-dir", str(cache), *common], env))
    remote_wall = time.monotonic() - t
    shutil.rmtree(cache, ignore_errors=True)
    return {"local": local["epochs"], "s3": remote["epochs"], "upload_s": upload_s, "s3_wall_s": remote_wall,
            "bytes": sum(p.stat().st_size for p in ds.iterdir()), "shards": len(list(ds.glob("*.slk")))}


def dir_bytes(d: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.exists() else 0


def global_rows(exe: str, work: pathlib.Path, a: argparse.Namespace) -> dict[str, Any]:
    """`global` shuffle from s3://, one cold epoch each with `cache_bytes` a quarter of
    the dataset: whole shards (`range_reads=never`) and ranged reads (`auto` picks them). Served by s3s-fs (`--s3s-fs`): moto reads the whole object for every
    ranged GET, which would measure moto."""
    if not a.s3s_fs:
        return {"skipped": "needs --s3s-fs PATH (cargo install s3s-fs@0.14.1 --features binary): moto reads the "
                           "whole object for every ranged GET"}
    ds = work / "ds"
    root = work / "s3s-root"
    shutil.rmtree(root, ignore_errors=True)
    (root / BUCKET).mkdir(parents=True)
    port = free_port()
    env = dict(os.environ, **CREDENTIALS, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    server = subprocess.Popen([a.s3s_fs, "--host", "127.0.0.1", "--port", str(port), "--access-key",
                               CREDENTIALS["AWS_ACCESS_KEY_ID"], "--secret-key", CREDENTIALS["AWS_SECRET_ACCESS_KEY"], str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        run([exe, "upload", str(ds), f"s3://{BUCKET}/ds", "--trust", str(work / "issuer.key.pub")], env)
        total = sum(p.stat().st_size for p in ds.glob("*.slk"))
        largest = max(p.stat().st_size for p in ds.glob("*.slk"))
        common = ["--keyring", str(work / "keyring.json"), "--token", str(work / "job.token"),
                  "--trust", str(work / "issuer.key.pub"), "--batch-size", str(a.batch_size),
                  "--shuffle", "global", "--epochs", "1", "--json"]
        budget = max(total // 4, largest)
        out: dict[str, Any] = {"budget": budget}
        for name, mode in (("whole", "never"), ("ranged", "auto")):
            extra = ["--cache-bytes", str(budget), "--range-reads", mode]
            cache = work / f"cache-{name}"
            shutil.rmtree(cache, ignore_errors=True)
            peak = [0]
            done = threading.Event()

            def sample(cache: pathlib.Path = cache, peak: list[int] = peak, done: threading.Event = done) -> None:
                while not done.wait(0.1):
                    with contextlib.suppress(OSError):
                        peak[0] = max(peak[0], dir_bytes(cache))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                r = json.loads(run([exe, "bench", f"s3://{BUCKET}/ds", "--cache-dir", str(cache), *common, *extra], env))
            finally:
                done.set()
                sampler.join()
            out[name] = dict(r["epochs"][0], cache_bytes=dir_bytes(cache), cache_peak_bytes=max(peak[0], dir_bytes(cache)))
            shutil.rmtree(cache, ignore_errors=True)
        return out
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(root, ignore_errors=True)


def allow_http_for_litdata(endpoint: str) -> None:
    """litdata builds its obstore S3Store with fixed client options (no ``allow_http``),
    which overrule ``AWS_ALLOW_HTTP``; obstore then refuses an ``http://`` endpoint."""
    if not endpoint.startswith("http://"):
        return
    from litdata.streaming import downloader

    opts = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(opts, dict) and not opts.get("allow_http"):
        downloader._OBSTORE_CLIENT_OPTIONS = {**opts, "allow_http": True}


def prepare_litdata(shape: Shape, work: pathlib.Path, name: str, s3: Any) -> dict[str, float]:
    """Writes the samples with litdata.optimize() and uploads them to s3://bench/<name>."""
    from prepare import prep_litdata

    with output_to(work / "litdata-optimize.log"):
        optimize_s = prep_litdata(shape, str(work), encrypted=name == "litdata-fernet")["seconds"]
    out = work / shape.name / name
    t = time.monotonic()
    for f in sorted(out.iterdir()):
        s3.upload_file(str(f), BUCKET, f"{name}/{f.name}")
    upload_s = time.monotonic() - t
    shutil.rmtree(out)  # read from the bucket from now on
    return {"optimize_s": optimize_s, "upload_s": upload_s}


def stream_litdata(shape: Shape, work: pathlib.Path, name: str, storage_options: dict[str, str]) -> list[dict[str, Any]]:
    """Two epochs of s3://bench/<name> through StreamingDataset + StreamingDataLoader,
    with an empty cache directory at the start."""
    from litdata import StreamingDataLoader, StreamingDataset

    kwargs: dict[str, Any] = {}
    if name == "litdata-fernet":
        from litdata.utilities.encryption import FernetEncryption
        from prepare import FERNET_PASSWORD

        kwargs["encryption"] = FernetEncryption.load(str(work / shape.name / "fernet.pem"), FERNET_PASSWORD)
    cache = work / f"{name}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    plain = np.load(plaintext_path(str(work), shape), mmap_mode="r")
    ds = StreamingDataset(f"s3://{BUCKET}/{name}", cache_dir=str(cache), shuffle=True, storage_options=storage_options,
                          **kwargs)
    dl = StreamingDataLoader(ds, batch_size=shape.batch, num_workers=0)
    epochs = []
    try:
        for _ in range(2):
            check, nbytes, first = SpotCheck(plain, every=max(1, shape.count // shape.batch // 50)), 0, None
            t0 = time.perf_counter()
            for b in dl:
                x = b["x"]
                if first is None:
                    first = time.perf_counter() - t0
                nbytes += x.numel() * x.element_size()
                check.batch(x.numpy())
            secs = time.perf_counter() - t0
            summary = check.finish(shape.count)
            epochs.append({"first_batch_ms": (first or 0.0) * 1e3, "gb_per_s": nbytes / secs / 1e9, "seconds": secs,
                           "bytes": nbytes, "samples": summary["samples"], "errors": summary["errors"]})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return epochs


def litdata_rows(shape: Shape, work: pathlib.Path, endpoint: str) -> dict[str, dict[str, Any]]:
    """Each litdata variant's epochs, or {"skipped": why} where it cannot run."""
    try:
        import boto3
        import litdata  # noqa: F401

        allow_http_for_litdata(endpoint)
    except Exception as e:
        return {name: {"skipped": f"{why(e)} (bash benches/compare/install.sh .venv)"} for name in LITDATA_VARIANTS}
    storage_options = {"endpoint_url": endpoint, "region_name": CREDENTIALS["AWS_REGION"],
                       "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                       "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    s3 = boto3.client("s3", **storage_options)
    out: dict[str, dict[str, Any]] = {}
    for name in LITDATA_VARIANTS:
        try:
            out[name] = prepare_litdata(shape, work, name, s3)
            out[name]["epochs"] = stream_litdata(shape, work, name, storage_options)
        except Exception as e:
            out[name] = {"skipped": why(e)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shardlock", default="target/release/shardlock")
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--sample-kib", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", default="64MiB")
    ap.add_argument("--skip-litdata", action="store_true", help="shardlock rows only")
    ap.add_argument("--s3s-fs", default=None, help="s3s-fs binary: adds global-shuffle rows, whole shards vs ranged reads")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temp dir, removed)")
    a = ap.parse_args()
    exe = os.path.abspath(a.shardlock)
    moto = shutil.which("moto_server", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("moto_server")
    if not moto:
        sys.exit("moto_server not found: pip install 'moto[server]' (make setup)")
    work = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="s3bench-"))
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, **CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        n = int(a.gib * (1 << 30)) // (a.sample_kib << 10)
        shape = Shape("s3bench", (a.sample_kib << 10,), n, a.batch_size)
        npy = pathlib.Path(plaintext_path(str(work), shape))
        write_plaintext(str(npy), shape)
        wait_for_port(port)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("PUT", f"/{BUCKET}")  # create the bucket (moto checks no signature)
        assert conn.getresponse().status == 200
        conn.close()

        sl = shardlock_rows(exe, work, npy, a, env)
        glob = global_rows(exe, work, a)
        lit = {} if a.skip_litdata else litdata_rows(shape, work, endpoint)

        print(f"dataset: {n} samples of {a.sample_kib} KiB ({shape.total_bytes / 1e9:.2f} GB), batch {a.batch_size}; "
              f"shardlock: {sl['bytes'] / 1e9:.2f} GB in {sl['shards']} shards, upload {sl['upload_s']:.1f} s, "
              f"s3 bench wall {sl['s3_wall_s']:.1f} s (incl. manifest)")
        for name, r in lit.items():
            if "skipped" not in r:
                print(f"{name}: optimize() {r['optimize_s']:.1f} s, upload {r['upload_s']:.1f} s")
        rows = [("shardlock local, epoch 0", sl["local"][0]), ("shardlock local, epoch 1", sl["local"][1]),
                ("shardlock s3 cold, epoch 0", sl["s3"][0]), ("shardlock s3 cached, epoch 1", sl["s3"][1])]
        for name, r in lit.items():
            if "epochs" in r:
                rows += [(f"{name} s3 cold, epoch 0", r["epochs"][0]), (f"{name} s3 cached, epoch 1", r["epochs"][1])]
        print(f"{'source':<32} {'first batch ms':>15} {'GB/s':>8} {'samples':>9}")
        for label, e in rows:
            print(f"{label:<32} {e['first_batch_ms']:>15.1f} {e['gb_per_s']:>8.2f} {e['samples']:>9}")
        for name, r in lit.items():
            if "skipped" in r:
                print(f"{name}: skipped: {r['skipped']}")
        if "skipped" in glob:
            print(f"global shuffle rows: skipped: {glob['skipped']}")
        else:
            print(f"global shuffle from s3s-fs, one cold epoch each, cache_bytes {glob['budget'] / 1e6:.0f} MB:\n"
                  f"{'reads':<32} {'first batch ms':>15} {'GB/s':>8} {'samples':>9} {'GB moved':>9} {'cache MB':>9} "
                  f"{'peak MB':>8}")
            for label, e in (("whole shards (never)", glob["whole"]), ("ranged (auto)", glob["ranged"])):
                print(f"{label:<32} {e['first_batch_ms']:>15.1f} {e['gb_per_s']:>8.2f} {e['samples']:>9} "
                      f"{e['remote_bytes'] / 1e9:>9.2f} {e['cache_bytes'] / 1e6:>9.1f} {e['cache_peak_bytes'] / 1e6:>8.1f}")
        errors = [f"{name} epoch {i}: {err}" for name, r in lit.items() for i, e in enumerate(r.get("epochs", []))
                  for err in e["errors"]]
        for err in errors:
            print(f"WRONG SAMPLES: {err}")
        print(json.dumps({"local": sl["local"], "s3": sl["s3"], "upload_s": sl["upload_s"], "bytes": sl["bytes"],
                          "global": glob, "litdata": lit}))
        if errors:
            sys.exit(1)
    finally:
        server.kill()
        server.wait()
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
