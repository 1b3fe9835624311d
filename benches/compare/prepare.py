"""Writes one shape's dataset in one loader's format, timing the pack (encrypt) step:

    python benches/compare/prepare.py STEP SHAPE DATA_DIR [--small]

STEP: plain | shardlock | litdata | litdata-fernet | handrolled | mds. Prints one JSON
line: seconds, plaintext bytes in, GB/s, or {"skipped": why}. Run by run.py, each step
in its own process so that its CPU time and memory are its own."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Shape, plaintext_path, sample_dict, shapes, write_plaintext  # noqa: E402

#: litdata's documented passwords are strings; this one only has to be the same at read time.
FERNET_PASSWORD = "shardlock-compare"
#: Workers for litdata.optimize(): both cores, its best on this machine.
OPTIMIZE_WORKERS = 2


def shardlock_bin() -> str:
    return os.environ.get("SHARDLOCK_BIN", "target/release/shardlock")


def _cli(*args: str) -> str:
    return subprocess.run([shardlock_bin(), *args], check=True, capture_output=True, text=True).stdout


def prep_plain(shape: Shape, data: str) -> dict:
    write_plaintext(plaintext_path(data, shape), shape)
    return {"bytes": shape.total_bytes}


def prep_shardlock(shape: Shape, data: str) -> dict:
    """keygen, pack (timed: the CLI process, reading the .npy from page cache), token."""
    d = os.path.join(data, shape.name, "shardlock")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    kr, ik = os.path.join(d, "keyring.json"), os.path.join(d, "issuer.key")
    _cli("keygen", "kek", "--out", kr)
    _cli("keygen", "issuer", "--out", ik)
    t0 = time.perf_counter()
    out = _cli("pack", "--keyring", kr, "--issuer-key", ik, "--dataset-id", f"compare/{shape.name}",
               "--json", "--out", os.path.join(d, "ds"), plaintext_path(data, shape))
    secs = time.perf_counter() - t0
    _cli("token", "issue", "--issuer-key", ik, "--dataset", f"compare/{shape.name}", "--principal", "compare",
         "--ops", "read", "--ttl", "24h", "--out", os.path.join(d, "job.token"))
    return {"seconds": secs, "bytes": shape.total_bytes, "cli": json.loads(out), "threads": 1}


def prep_litdata(shape: Shape, data: str, encrypted: bool) -> dict:
    import litdata

    out = os.path.join(data, shape.name, "litdata-fernet" if encrypted else "litdata")
    shutil.rmtree(out, ignore_errors=True)
    kwargs = {}
    if encrypted:
        from litdata.utilities.encryption import FernetEncryption

        enc = FernetEncryption(password=FERNET_PASSWORD, level="chunk")
        kwargs["encryption"] = enc
    t0 = time.perf_counter()
    litdata.optimize(fn=functools.partial(sample_dict, plaintext_path(data, shape)), inputs=list(range(shape.count)),
                     output_dir=out, chunk_bytes="64MB", num_workers=OPTIMIZE_WORKERS, **kwargs)
    secs = time.perf_counter() - t0
    if encrypted:
        enc.save(os.path.join(data, shape.name, "fernet.pem"))
    return {"seconds": secs, "bytes": shape.total_bytes, "threads": OPTIMIZE_WORKERS}


def prep_handrolled(shape: Shape, data: str) -> dict:
    import handrolled

    plain = np.load(plaintext_path(data, shape), mmap_mode="r")
    t0 = time.perf_counter()
    n = handrolled.write(plain, os.path.join(data, shape.name, "handrolled"))
    return {"seconds": time.perf_counter() - t0, "bytes": n, "threads": 1}


def mds_encoding(shape: Shape) -> str:
    return "ndarray:uint8:" + ",".join(str(d) for d in shape.dims)


def prep_mds(shape: Shape, data: str) -> dict:
    from streaming import MDSWriter

    out = os.path.join(data, shape.name, "mds")
    shutil.rmtree(out, ignore_errors=True)
    path = plaintext_path(data, shape)
    t0 = time.perf_counter()
    with MDSWriter(out=out, columns={"x": mds_encoding(shape)}, size_limit="64mb") as w:
        for i in range(shape.count):
            w.write(sample_dict(path, i))
    return {"seconds": time.perf_counter() - t0, "bytes": shape.total_bytes, "threads": 1}


STEPS = {
    "plain": prep_plain,
    "shardlock": prep_shardlock,
    "litdata": functools.partial(prep_litdata, encrypted=False),
    "litdata-fernet": functools.partial(prep_litdata, encrypted=True),
    "handrolled": prep_handrolled,
    "mds": prep_mds,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=sorted(STEPS))
    ap.add_argument("shape")
    ap.add_argument("data")
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    r = STEPS[a.step](shapes(a.small)[a.shape], a.data)
    if "seconds" in r:
        r["gb_per_s"] = r["bytes"] / r["seconds"] / 1e9
    print(json.dumps(r))


if __name__ == "__main__":
    main()
