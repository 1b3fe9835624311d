"""Streaming from S3-compatible object storage vs local disk, side by side in one run.

Starts ``moto_server`` on a free port of 127.0.0.1, packs a dataset of ``--gib`` GiB
(``--sample-kib`` KiB uint8 samples), uploads it with ``shardlock upload``, then runs
``shardlock bench --json`` three times in a row:

1. local directory (page cache warm after packing), 2 epochs;
2. ``s3://`` with an empty cache directory: epoch 0 is cold (downloads), epoch 1 reads
   the cache;
and prints first-batch latency and GB/s of plaintext delivered for each.

    python benches/s3_bench.py --shardlock target/release/shardlock --gib 2

The server is killed at the end, also on errors. Needs ``moto[server]`` in the venv
(``make setup``) and a release build of the CLI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shardlock", default="target/release/shardlock")
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--sample-kib", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", default="64MiB")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temp dir, removed)")
    a = ap.parse_args()
    exe = os.path.abspath(a.shardlock)
    moto = shutil.which("moto_server", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("moto_server")
    if not moto:
        sys.exit("moto_server not found: pip install 'moto[server]' (make setup)")
    work = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="s3bench-"))
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Dataset.
        n = int(a.gib * (1 << 30)) // (a.sample_kib << 10)
        npy = work / "x.npy"
        arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(n, a.sample_kib << 10))
        rng = np.random.default_rng(0)
        for i in range(0, n, 256):
            arr[i : i + 256] = rng.integers(0, 256, size=arr[i : i + 256].shape, dtype=np.uint8)
        arr.flush()
        del arr
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
        npy.unlink()
        run([exe, "token", "issue", "--issuer-key", str(work / "issuer.key"), "--dataset", "bench/s3",
             "--principal", "bench", "--ttl", "2h", "--out", str(work / "job.token")], env)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("PUT", "/bench")  # create the bucket (moto checks no signature)
        assert conn.getresponse().status == 200
        conn.close()
        t = time.monotonic()
        run([exe, "upload", str(ds), "s3://bench/ds"], env)
        upload_s = time.monotonic() - t

        common = ["--keyring", str(work / "keyring.json"), "--token", str(work / "job.token"),
                  "--trust", str(work / "issuer.key.pub"), "--batch-size", str(a.batch_size),
                  "--shuffle", "window", "--epochs", "2", "--json"]
        local = json.loads(run([exe, "bench", str(ds), *common], env))
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        t = time.monotonic()
        remote = json.loads(run([exe, "bench", "s3://bench/ds", "--cache-dir", str(cache), *common], env))
        remote_wall = time.monotonic() - t
        total = sum(p.stat().st_size for p in ds.iterdir())
        print(f"dataset: {total / 1e9:.2f} GB in {len(list(ds.glob('*.slk')))} shards, {n} samples of "
              f"{a.sample_kib} KiB; upload {upload_s:.1f} s; s3 bench wall {remote_wall:.1f} s (incl. manifest)")
        print(f"{'source':<22} {'first batch ms':>15} {'GB/s':>8}")
        le, re_ = local["epochs"], remote["epochs"]
        print(f"{'local, epoch 0':<22} {le[0]['first_batch_ms']:>15.1f} {le[0]['gb_per_s']:>8.2f}")
        print(f"{'local, epoch 1':<22} {le[1]['first_batch_ms']:>15.1f} {le[1]['gb_per_s']:>8.2f}")
        print(f"{'s3 cold, epoch 0':<22} {re_[0]['first_batch_ms']:>15.1f} {re_[0]['gb_per_s']:>8.2f}")
        print(f"{'s3 cached, epoch 1':<22} {re_[1]['first_batch_ms']:>15.1f} {re_[1]['gb_per_s']:>8.2f}")
        print(json.dumps({"local": le, "s3": re_, "upload_s": upload_s, "bytes": total}))
    finally:
        server.kill()
        server.wait()
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
