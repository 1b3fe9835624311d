"""Token windows for language models, side by side in one run: shardlock's
`Loader(token_windows=...)` (encrypted) against litdata's `TokensLoader` (plaintext) on
the same token ids.

    python benches/tokens.py DATA_DIR [--small] [--json OUT]

The corpus is generated (nothing is downloaded): documents of u32 token ids drawn from
a Zipf law over GPT-2's 50,257 ids, lengths log-normal around 700 tokens. Both loaders
deliver `[8, 2049]` windows (seq_len 2048 + 1) cut from the documents concatenated
without separators, shuffled. Reported: tokens per second over the second epoch (the
first warms the page cache and, for litdata, its chunk index), median of two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np

SEQ = 2048
BATCH = 8


def corpus(n_docs: int):
    rng = np.random.default_rng(7)
    lengths = np.clip(rng.lognormal(6.3, 0.8, n_docs), 1, 50_000).astype(np.int64)
    ids = (np.minimum(rng.zipf(1.1, int(lengths.sum())), 50_257) - 1).astype(np.uint32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return ids, offsets


def _litdata_doc(item):
    """litdata optimize() fn: one document as an int32 tensor (module level for its workers)."""
    import torch

    path, lo, hi = item
    ids = np.load(path, mmap_mode="r")
    return torch.from_numpy(np.array(ids[lo:hi], dtype=np.int32))


def time_epochs(make_iter, epochs: int = 2) -> list:
    rates = []
    for _ in range(epochs):
        t0, tokens = time.perf_counter(), 0
        for batch in make_iter():
            tokens += (batch["tokens"] if isinstance(batch, dict) else batch).numel()
        rates.append(tokens / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    import pyarrow as pa
    import torch

    import shardlock

    shutil.rmtree(a.data, ignore_errors=True)
    os.makedirs(a.data)
    ids, offsets = corpus(3_000 if a.small else 70_000)
    np.save(os.path.join(a.data, "ids.npy"), ids)
    print(f"{len(offsets) - 1} documents, {len(ids) / 1e6:.1f} M tokens", file=sys.stderr)
    rows = []

    kr, ik = os.path.join(a.data, "keyring.json"), os.path.join(a.data, "issuer.key")
    shardlock.create_keyring(kr)
    trust = shardlock.create_issuer_key(ik)
    table = pa.table({"tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids))})
    shardlock.pack(table, os.path.join(a.data, "shardlock"), keyring=kr, issuer_key=ik, dataset_id="tokens",
                   progress=False)
    tok = os.path.join(a.data, "job.token")
    shardlock.issue_token(ik, tok, dataset="tokens", principal="bench")
    for widen in (True, False):
        tw = shardlock.TokenWindows("tokens", SEQ, shuffle_windows=1024, widen=widen)
        lo = shardlock.Loader(os.path.join(a.data, "shardlock"), keyring=kr, token=tok, trust=trust,
                              batch_size=BATCH, shuffle="window", token_windows=tw)
        runs = [time_epochs(lambda: iter(lo))[-1] for _ in range(2)]
        rows.append({"loader": f"shardlock token_windows ({'int64' if widen else 'uint32'}), encrypted",
                     "tokens_per_s": statistics.median(runs)})
        print(json.dumps(rows[-1]), file=sys.stderr)

    try:
        from litdata import StreamingDataLoader, StreamingDataset, TokensLoader, optimize
    except ImportError as e:
        rows.append({"loader": "litdata TokensLoader", "skipped": f"litdata is not installed ({e})"})
    else:
        out = os.path.join(a.data, "litdata")
        path = os.path.join(a.data, "ids.npy")
        items = [(path, int(offsets[i]), int(offsets[i + 1])) for i in range(len(offsets) - 1)]
        optimize(fn=_litdata_doc, inputs=items, output_dir=out, chunk_size=(SEQ + 1) * 1024, num_workers=2,
                 item_loader=TokensLoader())
        for workers in (0, 2):
            def make_iter():
                ds = StreamingDataset(out, item_loader=TokensLoader(block_size=SEQ + 1), shuffle=True, seed=0)
                return iter(StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, drop_last=True))
            runs = [time_epochs(make_iter)[-1] for _ in range(2)]
            rows.append({"loader": f"litdata TokensLoader (int32), plaintext, {workers} workers",
                         "tokens_per_s": statistics.median(runs)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    best_peer = max((r["tokens_per_s"] for r in rows if r["loader"].startswith("litdata") and "tokens_per_s" in r),
                    default=None)
    print(f"token windows [{BATCH}, {SEQ + 1}], {len(ids) / 1e6:.1f} M tokens, {os.cpu_count()} cores, "
          "second epoch, median of 2 runs\n")
    print("| loader | M tokens/s | vs best litdata |")
    print("| --- | ---: | ---: |")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['loader']} | skipped: {r['skipped']} | |")
            continue
        ratio = f"{r['tokens_per_s'] / best_peer:.2f}" if best_peer else ""
        print(f"| {r['loader']} | {r['tokens_per_s'] / 1e6:.1f} | {ratio} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
