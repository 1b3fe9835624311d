"""Data-parallel training under torchrun on an encrypted dataset.

    python examples/train_ddp.py --prepare DIR        # keys, dataset, token in DIR
    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py DIR

Each rank (gloo, CPU) streams its share through a ``shardlock.torch.DataLoader`` with
two workers: shardlock takes the rank and world size from the process group, and the
script checks across ranks that every epoch the ranks read disjoint samples that cover
the dataset, and that the loss falls.
"""

import argparse
import pathlib

import torch
import torch.distributed as dist
from _blobs import blobs_kwargs, make_blobs

import shardlock

SAMPLES = 8000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=pathlib.Path)
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    if args.prepare:
        make_blobs(args.dir, SAMPLES, "train_ddp")
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    kw = blobs_kwargs(args.dir)
    ds = shardlock.torch.IterableDataset(kw.pop("path"), **kw, batch_size=200, seed=0, sample_ids=True)
    dl = shardlock.torch.DataLoader(ds, num_workers=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for epoch in range(args.epochs):
        ids, total, n = [], 0.0, 0
        for batch in dl:
            loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            ids += batch["sample_id"].tolist()
            total, n = total + loss.item() * len(batch["y"]), n + len(batch["y"])
        every = [None] * world
        dist.all_gather_object(every, ids)
        losses.append(total / n)
        if rank == 0:
            flat = [i for r in every for i in r]
            if len(set(flat)) != len(flat) or len(flat) != SAMPLES // 200 * 200:
                raise SystemExit(f"epoch {epoch}: ranks read {len(flat)} samples, {len(set(flat))} distinct")
            print(f"epoch {epoch}: {world} ranks read {[len(r) for r in every]} disjoint samples, "
                  f"loss {losses[-1]:.4f} on rank 0")
    dist.destroy_process_group()
    if not losses[-1] < losses[0]:
        raise SystemExit(f"rank {rank}: loss did not fall: {losses}")


if __name__ == "__main__":
    main()
