"""Writes one shape's dataset in one loader's format, timing the pack (encrypt) step:

    python benches/compare/prepare.py STEP SHAPE DATA_DIR [--small]

STEP: plain | disk | shardlock | litdata | litdata-fernet | handrolled | mds | parquet |
shardlock-parquet | litdata-parquet | mds-parquet. Prints one JSON line: seconds,
plaintext bytes in, GB/s, or {"skipped": why}. Run by run.py, each step in its own
process so that its CPU time and memory are its own.

`disk` times a sequential write of the same number of bytes with fsync (the disk's
write rate in this run, the reference of the pack goal); `parquet` writes the plaintext
as Parquet (one binary column `x` holding each sample's bytes, 64 MiB row groups,
uncompressed), which the `*-parquet` packers then read: shardlock.pack, litdata
optimize() and MDSWriter from the same Parquet source. (A fixed_size_list<uint8> column
would cap them all: pyarrow decodes one at ~0.09 GB/s on this machine, a binary column
at 1.4 GB/s on one thread.)"""

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


def prep_disk(shape: Shape, data: str) -> dict:
    """Sequential write of the dataset's size in 16 MiB blocks, then fsync: `dd
    conv=fsync` in Python, so the ratio's reference is measured in the same run."""
    path = os.path.join(data, shape.name, "disk-write.bin")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    block = os.urandom(16 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = shape.total_bytes
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        f.flush()
        os.fsync(f.fileno())
    secs = time.perf_counter() - t0
    os.remove(path)
    return {"seconds": secs, "bytes": shape.total_bytes, "threads": 1}


def parquet_dir(data: str, shape: Shape) -> str:
    return os.path.join(data, shape.name, "parquet")


def prep_parquet(shape: Shape, data: str) -> dict:
    """The plaintext as Parquet: column `x`, binary, each sample's bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = parquet_dir(data, shape)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    plain = np.load(plaintext_path(data, shape), mmap_mode="r").reshape(shape.count, -1)
    rows = max(1, (64 << 20) // shape.sample_bytes)
    with pq.ParquetWriter(os.path.join(out, "part-0.parquet"), pa.schema([("x", pa.binary())]),
                          compression="none") as w:
        for lo in range(0, shape.count, rows):
            block = np.ascontiguousarray(plain[lo: lo + rows]).reshape(-1)
            n = len(block) // shape.sample_bytes
            offsets = pa.array(np.arange(n + 1, dtype=np.int32) * shape.sample_bytes)
            w.write_table(pa.table({"x": pa.BinaryArray.from_buffers(pa.binary(), n, [None, offsets.buffers()[1],
                                                                                  pa.py_buffer(block)])}),
                          row_group_size=rows)
    return {"bytes": shape.total_bytes}


def _parquet_row_groups(data: str, shape: Shape) -> list:
    import pyarrow.parquet as pq

    d = parquet_dir(data, shape)
    return [(os.path.join(d, f), g) for f in sorted(os.listdir(d))
            for g in range(pq.ParquetFile(os.path.join(d, f)).num_row_groups)]


def parquet_rows(dims: tuple, item: tuple):
    """The samples of one row group as {"x": array}: litdata's optimize() fn (a
    generator), module-level so its workers can unpickle it."""
    import pyarrow.parquet as pq

    path, group = item
    col = pq.ParquetFile(path).read_row_group(group, columns=["x"]).column("x").combine_chunks()
    flat = np.frombuffer(col.buffers()[2], dtype=np.uint8, count=len(col) * int(np.prod(dims)),
                         offset=int(np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset])).reshape(len(col), *dims)
    for row in flat:
        yield {"x": row}


def prep_shardlock_parquet(shape: Shape, data: str) -> dict:
    """shardlock.pack from the Parquet directory (Python; Arrow batches, no per-row Python)."""
    import shardlock

    d = os.path.join(data, shape.name, "shardlock-parquet")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    kr, ik = os.path.join(d, "keyring.json"), os.path.join(d, "issuer.key")
    shardlock.create_keyring(kr)
    shardlock.create_issuer_key(ik)
    t0 = time.perf_counter()
    n = shardlock.pack(parquet_dir(data, shape), os.path.join(d, "ds"), keyring=kr, issuer_key=ik,
                       dataset_id=f"compare/{shape.name}-parquet", progress=False)
    secs = time.perf_counter() - t0
    assert n == shape.count, (n, shape.count)
    return {"seconds": secs, "bytes": shape.total_bytes, "threads": _pack_threads()}


def _pack_threads() -> int:
    """The sealing threads shardlock's pack uses by default (the cores, at most 8)."""
    return min(os.cpu_count() or 1, 8)


def prep_litdata_parquet(shape: Shape, data: str) -> dict:
    import litdata

    out = os.path.join(data, shape.name, "litdata-parquet")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    litdata.optimize(fn=functools.partial(parquet_rows, shape.dims), inputs=_parquet_row_groups(data, shape),
                     output_dir=out, chunk_bytes="64MB", num_workers=OPTIMIZE_WORKERS)
    return {"seconds": time.perf_counter() - t0, "bytes": shape.total_bytes, "threads": OPTIMIZE_WORKERS}


def prep_mds_parquet(shape: Shape, data: str) -> dict:
    from streaming import MDSWriter

    out = os.path.join(data, shape.name, "mds-parquet")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with MDSWriter(out=out, columns={"x": mds_encoding(shape)}, size_limit="64mb") as w:
        for item in _parquet_row_groups(data, shape):
            for row in parquet_rows(shape.dims, item):
                w.write(row)
    return {"seconds": time.perf_counter() - t0, "bytes": shape.total_bytes, "threads": 1}


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
    return {"seconds": secs, "bytes": shape.total_bytes, "cli": json.loads(out), "threads": _pack_threads()}


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
    "disk": prep_disk,
    "parquet": prep_parquet,
    "shardlock-parquet": prep_shardlock_parquet,
    "litdata-parquet": prep_litdata_parquet,
    "mds-parquet": prep_mds_parquet,
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
