"""Size and speed of per-value zstd compression (`--compress FIELD=zstd[:LEVEL]`), side
by side in one run:

    python benches/compress.py DATA_DIR [--small] [--levels 1,3,9] [--json OUT]

Three generated datasets (nothing is downloaded):
- `random`: `make compare`'s 8 KiB samples of random bytes (incompressible: the cost
  of compressing what does not compress), a u8[8192] tensor packed from `.npy` by the CLI;
- `tokens`: documents of u32 token ids drawn from a Zipf law over a 50,257-id
  vocabulary (lengths log-normal around 700 tokens), a `list<u32>` field packed by
  `shardlock.pack` from a pyarrow table;
- `pixels`: 3x224x224 u8 images of smooth gradients plus Gaussian noise (sigma 2 levels),
  what raw sensor-like pixels give zstd, a tensor from `.npy` by the CLI.

For each dataset and each of `none` and the levels: pack time (GB/s of values before
compression), bytes of shards on disk (and their ratio to `none`), and the loader's
GB/s of decompressed values into batches (`shardlock bench`, window shuffle, median of
epochs 2-4, the shards page-cached). Prints a Markdown table; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np


def cli() -> str:
    return os.environ.get("SHARDLOCK_BIN", "target/release/shardlock")


def run(*args: str) -> str:
    return subprocess.run([cli(), *args], check=True, capture_output=True, text=True).stdout


def make_random(d: str, n: int) -> str:
    rng = np.random.default_rng(0)
    path = os.path.join(d, "x.npy")
    np.save(path, np.frombuffer(rng.bytes(n * 8192), dtype=np.uint8).reshape(n, 8192))
    return path


def make_pixels(d: str, n: int) -> str:
    rng = np.random.default_rng(1)
    path = os.path.join(d, "image.npy")
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, 224, 224))
    yy, xx = np.mgrid[0:224, 0:224]
    for i in range(n):
        a, b, c = rng.uniform(0.2, 1.5, 3)
        base = np.stack([(xx * a + yy * b) % 256, (xx * b + yy * c) % 256, (xx * c + yy * a) % 256])
        arr[i] = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
    arr.flush()
    del arr
    return path


def make_tokens(n_docs: int):
    import pyarrow as pa

    rng = np.random.default_rng(2)
    lengths = np.clip(rng.lognormal(6.3, 0.8, n_docs), 1, 20_000).astype(np.int64)
    ids = np.minimum(rng.zipf(1.1, int(lengths.sum())), 50_257).astype(np.uint32) - 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    col = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids))
    return pa.table({"tokens": col}), int(ids.nbytes)


def keys(d: str) -> tuple:
    kr, ik = os.path.join(d, "keyring.json"), os.path.join(d, "issuer.key")
    if not os.path.exists(kr):
        run("keygen", "kek", "--out", kr)
        run("keygen", "issuer", "--out", ik)
    return kr, ik


def bench(d: str, ds: str, dataset_id: str, kr: str, ik: str, batch: int) -> float:
    tok = os.path.join(d, dataset_id.replace("/", "_") + ".token")
    run("token", "issue", "--issuer-key", ik, "--dataset", dataset_id, "--principal", "bench", "--ops", "read",
        "--ttl", "1h", "--out", tok)
    out = json.loads(run("bench", ds, "--keyring", kr, "--token", tok, "--trust", ik + ".pub", "--batch-size",
                         str(batch), "--epochs", "4", "--shuffle", "window", "--json"))
    epochs = out["epochs"] if isinstance(out, dict) and "epochs" in out else out
    rates = [e["gb_per_s"] for e in epochs[1:]]
    return statistics.median(rates)


def shard_bytes(ds: str) -> int:
    return sum(os.path.getsize(os.path.join(ds, f)) for f in os.listdir(ds) if f.endswith(".slk"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--small", action="store_true", help="~10 MB per dataset (a smoke run)")
    ap.add_argument("--levels", default="1,3,9")
    ap.add_argument("--json")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    os.makedirs(a.data, exist_ok=True)
    kr, ik = keys(a.data)
    scale = 0.02 if a.small else 1.0
    rows = []
    for name in ["random", "tokens", "pixels"]:
        d = os.path.join(a.data, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        if name == "random":
            src, field, batch = make_random(d, int(60_000 * scale)), "x", 256
        elif name == "pixels":
            src, field, batch = make_pixels(d, int(2_000 * scale)), "image", 16 if a.small else 64
        else:
            table, raw_bytes = make_tokens(int(60_000 * scale))
            field, batch = "tokens", 64
        for level in [None, *levels]:
            tag = "none" if level is None else f"zstd:{level}"
            ds = os.path.join(d, tag.replace(":", "-"))
            dataset_id = f"compress/{name}-{tag.replace(':', '-')}"
            comp = [] if level is None else ["--compress", f"{field}={tag}"]
            t0 = time.perf_counter()
            if name == "tokens":
                import shardlock

                shardlock.pack(table, ds, keyring=kr, issuer_key=ik, dataset_id=dataset_id, progress=False,
                               compress=None if level is None else {field: tag})
                raw = raw_bytes
            else:
                out = json.loads(run("pack", "--keyring", kr, "--issuer-key", ik, "--dataset-id", dataset_id,
                                     "--json", "--out", ds, *comp, src))
                raw = out["plaintext_bytes"]
            secs = time.perf_counter() - t0
            rows.append({"data": name, "stored": tag, "raw_bytes": raw, "shard_bytes": shard_bytes(ds),
                         "pack_gb_per_s": raw / secs / 1e9, "load_gb_per_s": bench(d, ds, dataset_id, kr, ik, batch)})
            print(json.dumps(rows[-1]), file=sys.stderr)
            if level is not None:
                shutil.rmtree(ds)
    base = {r["data"]: r["shard_bytes"] for r in rows if r["stored"] == "none"}
    print(f"per-value zstd, {os.cpu_count()} cores; loader: window shuffle, median of epochs 2-4\n")
    print("| data | stored | values | on disk | of none | pack GB/s | loader GB/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['data']} | {r['stored']} | {r['raw_bytes'] / 1e6:.0f} MB | {r['shard_bytes'] / 1e6:.0f} MB | "
              f"{r['shard_bytes'] / base[r['data']]:.2f} | {r['pack_gb_per_s']:.2f} | {r['load_gb_per_s']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
