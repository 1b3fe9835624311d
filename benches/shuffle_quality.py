"""Shuffle quality per mode, from the sample ids one epoch yields:

- adjacent_same_shard: fraction of consecutive output samples from the same shard
  (a random permutation gives about sum(p_shard^2));
- adjacent_run: fraction of consecutive output samples whose ids differ by < 64
  (locality that a model could notice; ~0 for a random permutation);
- rank_corr: Spearman correlation between output position and dataset position
  (1.0 = dataset order, ~0 = no order left);
- batch_shards: mean number of distinct shards per batch.

    python benches/shuffle_quality.py DIR --keyring K --token T --trust P [--batch-size 256]
"""

import argparse
import json

import numpy as np

import shardlock


def quality(ids: np.ndarray, shard_of: np.ndarray, batch: int) -> dict:
    n = len(ids)
    pos = np.arange(n)
    rank = np.empty(n)
    rank[np.argsort(ids)] = pos
    rc = float(np.corrcoef(pos, rank)[0, 1])
    s = shard_of[ids]
    per_batch = [len(set(s[i:i + batch].tolist())) for i in range(0, n - batch + 1, batch)]
    return {
        "adjacent_same_shard": float(np.mean(s[1:] == s[:-1])),
        "adjacent_run": float(np.mean(np.abs(np.diff(ids.astype(np.int64))) < 64)),
        "rank_corr": round(rc, 4),
        "batch_shards": float(np.mean(per_batch)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--keyring", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--trust", required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    manifest = json.load(open(f"{args.dir}/manifest.json"))["body"]
    counts = [s["records"] for s in manifest["shards"]]
    shard_of = np.repeat(np.arange(len(counts)), counts)
    out = {}
    for mode in ("none", "window", "global"):
        loader = shardlock.Loader(args.dir, keyring=args.keyring, token=args.token, trust=args.trust,
                                  batch_size=args.batch_size, shuffle=mode, sample_ids=True, output="numpy",
                                  fields=[manifest["schema"]["fields"][0]["name"]])
        ids = np.concatenate([b["sample_id"] for b in loader])
        out[mode] = quality(ids, shard_of, args.batch_size)
        print(mode, json.dumps(out[mode]))


if __name__ == "__main__":
    main()
