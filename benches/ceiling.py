"""The loader against the crypto ceiling, per shape and shuffle: `shardlock bench
--ceiling` (the Rust loader, then both ceilings, in one process), then the Python
`shardlock.Loader` yielding torch CPU tensors on the same dataset, right after; 8 KiB
samples (batch 256) and 147 KiB samples (batch 64), shuffle none, window and global,
4 epochs each (median of epochs 2-4). Shares are of the ceilings of the same case.

    python benches/ceiling.py DATA_DIR [--small]      (make ceiling)

The data is random u8, packed into 64 MiB shards (36,864 x 8 KiB and 2,048 x 147 KiB,
about 300 MB each; --small: an eighth of that).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import shardlock


def python_loader(path, kr, token, trust, batch, shuffle) -> float:
    """Median GB/s of epochs 2-4 of `shardlock.Loader` yielding torch CPU tensors."""
    loader = shardlock.Loader(path, keyring=kr, token=token, trust=trust, batch_size=batch, shuffle=shuffle)
    rates = []
    for _ in range(4):
        t0, nbytes = time.perf_counter(), 0
        for b in loader:
            nbytes += sum(v.numel() * v.element_size() for v in b.values())
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--bin", default=os.environ.get("SHARDLOCK_BIN", "shardlock"))
    args = ap.parse_args()
    d = args.data
    os.makedirs(d, exist_ok=True)
    kr, iss = os.path.join(d, "kr.json"), os.path.join(d, "iss.key")
    if not os.path.exists(kr):
        shardlock.create_keyring(kr)
        shardlock.create_issuer_key(iss)
    rng = np.random.default_rng(0)
    scale = 8 if args.small else 1
    for name, n, size, batch in [("s8k", 36864 // scale, 8192, 256), ("s147k", 2048 // scale, 150528, 64)]:
        path = os.path.join(d, name)
        if not os.path.exists(os.path.join(path, "manifest.json")):
            x = rng.integers(0, 255, (n, size), dtype=np.uint8)
            shardlock.pack_numpy(path, {"x": x}, keyring=kr, issuer_key=iss, dataset_id=name, shard_size="64MiB",
                                 force=True)
        token = os.path.join(d, f"{name}.tok")
        shardlock.issue_token(iss, token, dataset=name, principal="bench")
        for shuffle in ("none", "window", "global"):
            out = subprocess.run([args.bin, "bench", path, "--keyring", kr, "--token", token, "--trust", iss + ".pub",
                                  "--batch-size", str(batch), "--epochs", "4", "--shuffle", shuffle, "--ceiling",
                                  "--json"], check=True, capture_output=True, text=True).stdout
            c = json.loads(out)["ceiling"]
            py = python_loader(path, kr, token, iss + ".pub", batch, shuffle)
            mm, ossl = c["aes_gcm_mmap_gb_per_s"], c["openssl_gb_per_s"]
            share = lambda x: f"{x / mm:.2f} / {x / ossl:.2f}" if ossl else f"{x / mm:.2f} / -"  # noqa: E731
            print(f"{size // 1024:>4} KiB  {shuffle:6s}  ceilings {mm:5.2f} (AES-GCM, mmap) / "
                  f"{(ossl or float('nan')):5.2f} (openssl) GB/s;  shardlock bench {c['loader_gb_per_s']:5.2f} GB/s = "
                  f"{share(c['loader_gb_per_s'])};  Python Loader {py:5.2f} GB/s = {share(py)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
