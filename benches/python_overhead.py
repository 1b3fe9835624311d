"""Python overhead: shardlock.Loader (torch tensors) vs the Rust `shardlock bench`, on
the same dataset with the same batch size, shuffle and epochs, alternated in one run.

    python benches/python_overhead.py DIR --keyring K --token T --trust P --batch-size 256 [--rounds 3]

Prints each measurement and the ratio of medians (Python / Rust GB/s).
"""

import argparse
import json
import statistics
import subprocess
import time

import shardlock


def rust(args) -> float:
    out = subprocess.run(
        [args.shardlock, "bench", args.dir, "--keyring", args.keyring, "--token", args.token, "--trust", args.trust,
         "--batch-size", str(args.batch_size), "--shuffle", args.shuffle, "--epochs", str(args.epochs), "--json"],
        check=True, capture_output=True, text=True).stdout
    eps = json.loads(out)["epochs"][1:] or json.loads(out)["epochs"]  # skip the warm-up epoch
    return statistics.median(e["gb_per_s"] for e in eps)


def python(args) -> float:
    loader = shardlock.Loader(args.dir, keyring=args.keyring, token=args.token, trust=args.trust,
                              batch_size=args.batch_size, shuffle=args.shuffle)
    rates = []
    for _ in range(args.epochs):
        t0, n = time.perf_counter(), 0
        for batch in loader:
            for v in batch.values():
                n += v.numel() * v.element_size() if hasattr(v, "numel") else sum(t.numel() * t.element_size() for t in v)
        rates.append(n / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates[1:] or rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--keyring", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--trust", required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shuffle", default="none")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shardlock", default="target/release/shardlock")
    args = ap.parse_args()
    r, p = [], []
    for i in range(args.rounds):
        r.append(rust(args))
        p.append(python(args))
        print(f"round {i}: rust {r[-1]:.2f} GB/s, python {p[-1]:.2f} GB/s")
    mr, mp = statistics.median(r), statistics.median(p)
    print(json.dumps({"rust_gb_per_s": mr, "python_gb_per_s": mp, "ratio": mp / mr, "dir": args.dir,
                      "batch_size": args.batch_size, "shuffle": args.shuffle}))


if __name__ == "__main__":
    main()
