"""batch_size="auto" over a heavy-tailed ragged epoch whose step memory grows with B * L**2.

One test body, two devices:

- ``simulated`` (CPU, every run): the step is ``SimulatedMemory`` (tests/simulated_memory.py)
  with an attention-like cost, and its peaks reach the loader through the recording CUDA
  stand-in (tests/cuda_standin.py) as ``torch.cuda.max_memory_allocated`` would -- so the
  learning path of a CUDA loader (StepMemory -> TokenPlanner -> ShapeCostModel) runs here.
- ``cuda`` (@pytest.mark.cuda): a real one-layer attention step that materialises float32
  ``(B, heads, L, L)`` scores and probabilities (no flash / SDPA memory savings), under a
  per-process memory cap that leaves it a few hundred MiB; the cap is lifted afterwards.

Sizes come from the device itself: the step budget is about four times the peak of one step
on a single longest sample, and the epoch has about ``TARGET_STEPS`` steps; ``token_bytes``
is guessed 8x under the measured cost of a token at the median length, so the first batches
really run out of memory.

"The largest shape that fits", both devices: for a padded length ``L``, the most samples ``B``
whose step peak -- the bytes the step needs beyond what was allocated before and after it,
what the loader measures -- stays within the step budget the loader plans in
(``planner.step_budget()``: ``memory_fraction`` of the free memory, less the staging ring),
found by bisection over ``B`` on the device.  The bar: over the steps that ran, the mean padded
tokens (``B * L``) is at least 80% of the mean of ``L * bisected B(L)`` over the same steps,
each capped by the padded tokens of the step's planned batch (a batch cannot hold samples its
length bucket does not have).  Also: 1 to 8 out-of-memory errors, none after the first quarter
of the epoch's steps, and every sample exactly once.

With ``GPULOADER_TOKENS_JSON`` set, the CUDA run writes its figures there
(benchmarks/gpu_check.sh gathers them into gpu_check.json).
"""
from __future__ import annotations

import gc
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpuloader as gl
from cuda_standin import FakeCuda
from gpuloader.allocator import StepMemory
from simulated_memory import SimulatedMemory

MiB = 1 << 20
CUDA0 = torch.device("cuda", 0)
VOCAB = 16             # small: the logits stay cheap next to the attention scores
MULTIPLE = 64          # pad_to_multiple_of: lengths repeat, as buckets do
MEDIAN, LONGEST = 64, 1024
TARGET_STEPS = 200     # scales the epoch: about 3x as many steps, with padding and tails
MAX_SAMPLES = 200_000  # whatever the device's costs, the dataset stays small


def heavy_tailed(n: int, seed: int) -> np.ndarray:
    """Log-normal lengths (sigma 1: a few samples 16x the median), clipped to [1, LONGEST]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.ceil(rng.lognormal(np.log(MEDIAN), 1.0, n)), 1, LONGEST).astype(np.int64)


def ragged_dataset(lengths: np.ndarray) -> gl.ArrayDataset:
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    values = (np.arange(int(offsets[-1]), dtype=np.int64) % VOCAB).astype(np.int16)
    return gl.ArrayDataset(tokens=gl.Ragged(values, offsets),
                           ids=np.arange(len(lengths), dtype=np.int64))


# ------------------------------------------------------------------------------ devices


class Simulated:
    """CPU: an attention-like cost (``fixed + 2 KiB * B*L + 128 B * B*L**2``, the last term
    about four float32 L x L matrices for each of 8 heads), peaks reported through the CUDA
    stand-in."""

    def __init__(self) -> None:
        self.sim = SimulatedMemory(limit=0, fixed=MiB, per_token=2048, per_token_length=128)
        self.fake = FakeCuda()
        self.free = 0

    def peak(self, batch: int, length: int) -> Optional[int]:
        return self.sim.base_peak(batch, length)

    def constrain(self, free: int) -> Dict[str, Any]:
        self.free = free
        return {"memory_budget": free}

    def attach(self, loader: gl.DataLoader) -> None:
        self.fake.stats = {"allocated_bytes.all.current": 0, "allocated_bytes.all.peak": 0}
        loader._memory = StepMemory(CUDA0, learn=True, cuda=self.fake)  # NOTE(user-peak)
        self.sim.limit = loader._tokens.planner.step_budget()

    def step(self, batch: Dict[str, torch.Tensor]) -> None:
        peak = self.sim.run(batch["tokens"], batch["tokens_lengths"])  # OOM over the limit
        self.fake.stats["allocated_bytes.all.peak"] = peak

    def close(self) -> None:
        pass


class QuadraticAttention(torch.nn.Module):
    """One attention layer with explicit float32 score matrices: memory grows with B * L**2.
    With 8 heads the scores outweigh the per-token activations from the shortest padded
    length (64) on, so the step's peak is always in the attention's backward."""

    def __init__(self, dim: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape
        x = self.embed(tokens.long())
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        real = torch.arange(n, device=tokens.device)[None, :] < lengths[:, None]  # (B, L)
        scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
        y = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(b, n, -1)
        logits = self.out(y)
        # next-token loss over the real tokens; shapes only (no boolean indexing, no host sync)
        losses = F.cross_entropy(logits.transpose(1, 2), tokens.long().roll(-1, dims=1),
                                 reduction="none")
        weights = real.roll(-1, dims=1) & real
        return (losses * weights).sum() / weights.sum().clamp(min=1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               tokens: torch.Tensor, lengths: torch.Tensor) -> None:
    """A function, so a failed step's activations die with its frame (oom_guard frees them)."""
    model(tokens, lengths).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Cuda:
    """A real GPU step under a per-process memory cap (``constrain``), lifted by ``close``."""

    def __init__(self) -> None:
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        self.model = QuadraticAttention().cuda()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.total = torch.cuda.get_device_properties(0).total_memory

    def peak(self, batch: int, length: int) -> Optional[int]:
        """The step peak of a ``(batch, length)`` batch, measured as StepMemory does; None
        when it runs out of memory."""
        tokens = torch.zeros((batch, length), dtype=torch.int16, device="cuda")
        lengths = torch.full((batch,), length, dtype=torch.int64, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        failed = False
        try:
            train_step(self.model, self.optimizer, tokens, lengths)
        except torch.cuda.OutOfMemoryError:
            failed = True
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if failed:
            gc.collect()
            torch.cuda.empty_cache()
            return None
        peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        return peak - max(before, after)

    def constrain(self, free: int) -> Dict[str, Any]:
        torch.cuda.empty_cache()
        cap = torch.cuda.memory_reserved() + free
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / self.total), 0)
        return {"device": "cuda"}

    def attach(self, loader: gl.DataLoader) -> None:
        pass

    def step(self, batch: Dict[str, torch.Tensor]) -> None:
        train_step(self.model, self.optimizer, batch["tokens"], batch["tokens_lengths"])

    def close(self) -> None:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        gc.collect()
        torch.cuda.empty_cache()


DEVICES: Dict[str, Callable[[], Any]] = {"simulated": Simulated, "cuda": Cuda}


# ------------------------------------------------------------------------------ the epoch


def largest_batch(peak: Callable[[int, int], Optional[int]], length: int, budget: int, *,
                  below: Optional[int] = None) -> int:
    """Most samples of ``length`` whose step peak fits ``budget`` (0 if none), by bisection;
    ``below``: a batch size known not to fit (else found by doubling)."""
    def fits(batch: int) -> bool:
        got = peak(batch, length)
        return got is not None and got <= budget

    low = 0
    high = below
    if high is None:
        high = 1
        while fits(high):
            low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def run_epoch(loader: gl.DataLoader, device: Any) -> Tuple[List[Tuple[int, int, bool]],
                                                            np.ndarray, List[int]]:
    """One epoch of guarded steps: per step ``(samples, padded length, failed)``, the ids the
    steps that ran delivered, and per step that ran the padded tokens of its planned batch."""
    tokens = loader._tokens
    order, ends = tokens.plan_epoch(loader._order, 0)
    starts = np.concatenate(([0], ends[:-1]))
    planned_of = np.repeat(np.arange(len(ends)), ends - starts)  # position -> planned batch
    span_tokens = [tokens.budget(1).padded(int(tokens.lengths[order[a:b]].max())) * (b - a)
                   for a, b in zip(starts.tolist(), ends.tolist())]
    optimizer = getattr(device, "optimizer", torch.nn.Linear(1, 1))
    shapes: List[Tuple[int, int, bool]] = []
    seen: List[torch.Tensor] = []  # clones; on CUDA compared once at the end (no host syncs)
    planned: List[int] = []
    for batch in loader:
        start = loader._epochs.active.last_start
        with loader.oom_guard(optimizer) as guard:
            device.step(batch)
        b, length = batch["tokens"].shape
        shapes.append((int(b), int(length), guard.failed))
        if not guard.failed:
            seen.append(batch["ids"].clone())
            planned.append(span_tokens[planned_of[start]])
    ids = torch.cat(seen).cpu().numpy() if seen else np.empty(0, np.int64)
    return shapes, ids, planned


def figures(shapes: List[Tuple[int, int, bool]], planned: List[int],
            peak: Callable[[int, int], Optional[int]], budget: int) -> Dict[str, Any]:
    """The bar's figures (module docstring); bisects at each padded length that ran."""
    ran = [(b, n) for b, n, failed in shapes if not failed]
    failed = [step for step, (*_, bad) in enumerate(shapes) if bad]
    best: Dict[int, int] = {}
    below = None
    for length in sorted({n for _, n in ran}):  # fewer samples fit as L grows
        best[length] = largest_batch(peak, length, budget, below=below)
        below = best[length] + 1
    tokens = np.array([b * n for b, n in ran], dtype=np.float64)
    reference = np.array([min(best[n] * n, cap) for (_, n), cap in zip(ran, planned)],
                         dtype=np.float64)
    return {"steps": len(shapes), "ooms": len(failed), "oom_steps": failed,
            "last_oom_step": max(failed, default=None),
            "mean_padded_tokens": float(tokens.mean()),
            "mean_bisected_max_tokens": float(reference.mean()),
            "ratio": float(tokens.mean() / reference.mean()),
            "step_budget_bytes": int(budget),
            "bisected_max_batch": {str(k): v for k, v in best.items()}}


@pytest.mark.parametrize("kind", ["simulated", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_heavy_tailed_epoch_fills_memory_with_few_early_ooms(kind):
    device = DEVICES[kind]()
    try:
        longest = device.peak(1, LONGEST)
        per_token = device.peak(64, MEDIAN) / (64 * MEDIAN)  # bytes a median token costs
        budget = 4 * longest  # about 4 longest samples a step
        fraction = 0.8
        mean = MEDIAN * math.exp(0.5)  # of the log-normal (before clipping)
        n = int(min(MAX_SAMPLES, TARGET_STEPS * budget / per_token / mean))
        lengths = heavy_tailed(n, seed=0)
        options = device.constrain(int(budget / fraction) + 16 * MiB)  # + the staging ring
        with gl.DataLoader(ragged_dataset(lengths), batch_size="auto", memory_fraction=fraction,
                           token_bytes=max(1, int(per_token / 8)), pad_to_multiple_of=MULTIPLE,
                           shuffle=True, seed=0, **options) as loader:
            device.attach(loader)
            shapes, ids, planned = run_epoch(loader, device)
            step_budget = loader._tokens.planner.step_budget()
            max_tokens = loader.max_tokens
        got = figures(shapes, planned, device.peak, step_budget)
    finally:
        device.close()
    got.update(device=kind, samples=n, max_tokens=max_tokens,
               longest_sample_peak_bytes=longest, median_token_bytes=per_token)
    where = os.environ.get("GPULOADER_TOKENS_JSON")
    if where and kind == "cuda":
        with open(where, "w") as f:
            json.dump(got, f, indent=1)
    brief = {k: v for k, v in got.items() if k != "bisected_max_batch"}
    assert np.array_equal(np.sort(ids), np.arange(n)), "every sample exactly once"
    assert 1 <= got["ooms"] <= 8, brief
    assert all(step < got["steps"] // 4 for step in got["oom_steps"]), brief
    assert got["ratio"] >= 0.8, brief
