"""Measuring one case: the timed window over a batch stream, and the synthetic training step."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from gpuloader.errors import ArgumentError, describe
from gpuloader.stats import rates

#: ``(ready, step)`` as :func:`make_step` returns them.
Steps = Tuple[Callable[[Any], None], Callable[[Any], None]]

COMPUTE_KINDS: Tuple[str, ...] = ("auto", "sleep", "spin", "matmul")


@dataclass
class Measurement:
    """One timed window of one case (seconds of wall clock, bytes of delivered batches)."""

    samples: int
    batches: int
    nbytes: int
    elapsed_s: float
    wait_s: float
    truncated: bool

    @property
    def samples_per_s(self) -> float:
        return rates(self.samples, self.nbytes, self.elapsed_s).samples_per_s

    @property
    def gb_per_s(self) -> float:
        return rates(self.samples, self.nbytes, self.elapsed_s).gb_per_s

    @property
    def stall_fraction(self) -> float:
        return rates(self.samples, self.nbytes, self.elapsed_s, self.wait_s).stall_fraction


def leaves(batch: Any) -> Iterator[Any]:
    """The non-container values of a (nested) dict / list / tuple batch, in order."""
    if isinstance(batch, Mapping):
        for value in batch.values():
            yield from leaves(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from leaves(value)
    else:
        yield batch


def _batch_len_and_bytes(batch: Any) -> Tuple[int, int]:
    rows, nbytes = 0, 0
    for leaf in leaves(batch):
        if isinstance(leaf, torch.Tensor):
            nbytes += leaf.numel() * leaf.element_size()
            rows = rows or (int(leaf.shape[0]) if leaf.dim() else 1)
        elif isinstance(leaf, np.ndarray):
            nbytes += leaf.nbytes
            rows = rows or (int(leaf.shape[0]) if leaf.ndim else 1)
    return rows, nbytes


def measure(batches: Iterator[Any], *, step: Callable[[Any], None], warmup: int,
            samples: Optional[int], time_cap_s: float,
            ready: Optional[Callable[[Any], None]] = None) -> Measurement:
    """Draw ``warmup`` batches untimed, then time batches until ``samples`` have been drawn.

    With ``samples=None`` the window is ``time_cap_s`` long (a calibration run).  ``ready``
    (optional) waits until a drawn batch is usable — on CUDA, until its copy has landed — and
    counts as waiting; ``step`` then runs on it (the synthetic training step).  The window stops
    at ``time_cap_s`` in any case; then ``truncated`` is True if ``samples`` was not reached.
    """
    for _ in range(warmup):
        batch = next(batches)
        if ready is not None:
            ready(batch)
        step(batch)
    wait = 0.0
    drawn = count = nbytes = 0
    truncated = False
    clock = time.perf_counter
    start = clock()
    while samples is None or drawn < samples:
        before = clock()
        batch = next(batches)
        if ready is not None:
            ready(batch)
        wait += clock() - before
        rows, size = _batch_len_and_bytes(batch)
        drawn += rows
        nbytes += size
        count += 1
        step(batch)
        if clock() - start >= time_cap_s:
            truncated = samples is not None and drawn < samples
            break
    elapsed = clock() - start
    return Measurement(drawn, count, nbytes, elapsed, wait, truncated)


def make_step(compute_ms: float, device: Union[str, torch.device] = "cpu",
              kind: str = "auto") -> Steps:
    """``(ready, step)`` for :func:`measure`: the consumer's wait for a batch and its work.

    ``ready`` synchronizes the current CUDA stream (so copy time counts as waiting; a no-op on
    the CPU).  ``step`` takes about ``compute_ms`` milliseconds: ``"matmul"`` runs a loop of
    matmuls on ``device`` calibrated to that time and synchronizes; ``"sleep"`` sleeps (the CPU
    and the GIL stay free, as during a GPU step); ``"spin"`` busy-waits; ``"auto"`` is matmul on
    CUDA and sleep on the CPU.
    """
    if kind not in COMPUTE_KINDS:
        raise ArgumentError(
            f"compute_kind must be one of {', '.join(map(repr, COMPUTE_KINDS))}, got "
            f"{describe(kind)}"
        )
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    seconds = compute_ms / 1000.0

    def sync(batch: Any = None) -> None:
        if cuda:
            torch.cuda.current_stream(dev).synchronize()

    if seconds <= 0:
        return sync, lambda batch: None
    if kind == "auto":
        kind = "matmul" if cuda else "sleep"
    if kind == "sleep":
        return sync, lambda batch: time.sleep(seconds)
    if kind == "spin":
        return sync, lambda batch: _spin(seconds)
    return sync, _matmul_step(seconds, dev, sync)


def _spin(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def _matmul_step(seconds: float, dev: torch.device,
                 sync: Callable[[], None]) -> Callable[[Any], None]:
    """A step of chained matmuls on ``dev`` (then ``sync``), calibrated to take ``seconds``."""
    size = 1024 if dev.type == "cuda" else 256
    a = torch.randn(size, size, device=dev)
    b = torch.randn(size, size, device=dev)

    def loop(k: int) -> None:
        c = a
        for _ in range(k):
            c = torch.mm(c, b).mul_(1e-3)
        sync()

    loop(2)
    start = time.perf_counter()
    loop(10)
    per = max((time.perf_counter() - start) / 10, 1e-7)
    iterations = max(1, int(round(seconds / per)))
    return lambda batch: loop(iterations)
