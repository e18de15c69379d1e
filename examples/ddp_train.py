"""Data-parallel training with gpuloader: one process per GPU (or per CPU slot), run by torchrun.

    torchrun --nproc_per_node=2 examples/ddp_train.py                  # CPU (gloo) or GPUs (nccl)
    torchrun --nproc_per_node=2 examples/ddp_train.py --data train.h5  # fields x (features), y (labels)
    torchrun --nproc_per_node=2 examples/ddp_train.py --simulate-oom 1:5   # rank 1 fails step 5

Every rank reads its own shard of each epoch (``distributed=True``); the ranks agree on the
batch size (the smallest any rank can hold), and an out-of-memory error on any rank rolls the
step back on every rank, which all shrink together and re-train the same samples.

The step runs forward and backward under ``model.no_sync()`` inside ``oom_guard`` and averages
the gradients only after the guard has agreed that every rank succeeded.  Letting DDP all-reduce
during ``backward`` would deadlock on an out-of-memory error: the failed rank never reaches the
gradient all-reduce its peers are waiting in.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gpuloader as gl


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None,
                   help="a .npy folder or HDF5 file with fields x (float features) and y (int "
                        "labels); default: a synthetic dataset in memory")
    p.add_argument("--samples", type=int, default=20_001, help="synthetic dataset size")
    p.add_argument("--features", type=int, default=32, help="synthetic feature width")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--memory-budget", type=int, default=1 << 20,
                   help='bytes batch_size="auto" may plan for on each rank; 0: measure the free '
                        "memory of the rank's device (default: 1 MiB, small enough to give "
                        "several batches on the synthetic data)")
    p.add_argument("--sample-bytes", type=int, default=0,
                   help="extra bytes one sample costs in the step (activations)")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simulate-oom", default=None, metavar="RANK:STEP",
                   help="raise a CUDA out-of-memory error on RANK at global step STEP, to see "
                        "every rank roll back and shrink")
    return p.parse_args()


def setup() -> Tuple[int, int, torch.device]:
    """Join the process group torchrun describes; pin this process to its local GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        # Before anything touches CUDA: device="cuda" (loader, tensors) and NCCL collectives
        # then all mean this rank's own GPU.
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def make_dataset(args: argparse.Namespace) -> Tuple[gl.ArrayDataset, int, int]:
    """(dataset with fields x, y; feature width; number of classes)."""
    if args.data is not None:
        ds = gl.open_dataset(args.data, fields=["x", "y"])
        features = int(np.prod(ds.fields["x"].shape))
        classes = int(max(ds[i]["y"].max() for i in range(min(len(ds), 1000)))) + 1
        return ds, features, classes
    rng = np.random.default_rng(1234)  # the same data on every rank
    x = rng.standard_normal((args.samples, args.features)).astype(np.float32)
    w = rng.standard_normal((args.features, 4)).astype(np.float32)
    y = (x @ w).argmax(axis=1).astype(np.int64)
    return gl.ArrayDataset(x=x, y=y), args.features, 4


def average_gradients(model: nn.Module, world_size: int) -> None:
    """All-reduce the gradients in one flat buffer (what DDP does in backward, done here after
    the OOM flag was agreed)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def train_step(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
               oom: bool = False) -> torch.Tensor:
    """Forward and backward; returns the loss, detached.  A function, so that when it runs out
    of memory its activations die with its frame and oom_guard can free them before the retry
    (bound in the loop body, they would outlive the guard).  ``oom`` simulates the error."""
    loss = loss_fn(model(x), y)
    if oom:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    loss.backward()
    return loss.detach()


def main() -> None:
    args = parse_args()
    rank, world_size, device = setup()
    torch.manual_seed(args.seed)
    oom_at: Optional[Tuple[int, int]] = None
    if args.simulate_oom:
        r, s = args.simulate_oom.split(":")
        oom_at = (int(r), int(s))

    ds, features, classes = make_dataset(args)
    loader = gl.DataLoader(ds, batch_size="auto", shuffle=True, distributed=True,
                           device=device, memory_budget=args.memory_budget or None,
                           sample_bytes=args.sample_bytes, max_batch_size=args.max_batch_size,
                           seed=args.seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, 64), nn.ReLU(),
                          nn.Linear(64, classes)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                  else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    print(f"[rank {rank}/{world_size}] device={device} dataset={len(ds)} shard={len(loader)} "
          f"batches of {loader.batch_size} (agreed auto size)", flush=True)

    step = 0
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        samples = batches = rollbacks = 0
        loss_sum = 0.0
        for batch in loader:
            x, y = batch["x"], batch["y"]
            with loader.oom_guard(optimizer) as guard:
                with ddp.no_sync():  # no gradient all-reduce until every rank has succeeded
                    loss = train_step(ddp, loss_fn, x, y, oom=oom_at == (rank, step))
            step += 1
            if guard.failed:  # rolled back on every rank; the samples come again, smaller
                rollbacks += 1
                print(f"[rank {rank}] step {step - 1}: out of memory on some rank, rolled back;"
                      f" batch size now {loader.batch_size}", flush=True)
                continue
            average_gradients(model, world_size)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            samples += len(y)
            batches += 1
            loss_sum += float(loss) * len(y)
        total = torch.tensor([samples], dtype=torch.int64,
                             device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(total)
        print(f"[rank {rank}] epoch {epoch}: {samples} samples in {batches} batches "
              f"({rollbacks} rolled back), mean loss {loss_sum / max(1, samples):.4f}, "
              f"batch size {loader.batch_size}; all ranks: {int(total.item())} samples "
              f"(dataset {len(ds)}, padded to a multiple of {world_size})", flush=True)
    loader.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
