"""Tests of gpuloader.bytelm: the byte-level causal LM (causality, padding, packing, learning on
real text), its next-byte loss and the unigram entropy it is compared with."""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from gpuloader import models
from gpuloader.bytelm import ByteLM, next_token_loss, unigram_entropy
from gpuloader.errors import ArgumentError, ArgumentTypeError


def small_model(seed: int = 0) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(d_model=32, layers=2, heads=2).eval()


def random_tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_output_at_t_does_not_depend_on_later_tokens():
    model = small_model()
    tokens = random_tokens(3, 24)
    changed = tokens.clone()
    changed[:, 10:] = random_tokens(3, 14, seed=2)
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:], atol=1e-3)  # later ones do


def test_padding_does_not_change_the_loss_of_real_tokens():
    model = small_model()
    short, long = random_tokens(7, seed=3), random_tokens(19, seed=4)
    lengths = torch.tensor([7, 19])
    losses = []
    for pad in (0, 255):
        batch = torch.full((2, 24), pad, dtype=torch.uint8)  # 24: more padding than needed
        batch[0, :7], batch[1, :19] = short, long
        with torch.no_grad():
            losses.append(next_token_loss(model(batch, lengths), batch, lengths,
                                          reduction="none"))
    assert torch.equal(losses[0] != 0, losses[1] != 0)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    with torch.no_grad():  # each sample alone, unpadded: the same per-byte losses
        alone = [next_token_loss(model(t[None]), t[None], reduction="none")[0]
                 for t in (short, long)]
    assert torch.allclose(losses[0][0, :7], alone[0], atol=1e-5)
    assert torch.allclose(losses[0][1, :19], alone[1], atol=1e-5)
    assert (losses[0][0, 6:] == 0).all() and (losses[0][1, 18:] == 0).all()
    # mean over the 6 + 18 predicted bytes, padding excluded
    with torch.no_grad():
        batch = torch.zeros((2, 24), dtype=torch.uint8)
        batch[0, :7], batch[1, :19] = short, long
        mean = next_token_loss(model(batch), batch, lengths)
    assert mean.item() == pytest.approx(float(torch.cat(alone).sum() / 24), rel=1e-5)


def test_packed_batches_match_padded_ones():
    model = small_model()
    samples = [random_tokens(n, seed=n) for n in (5, 1, 12, 0, 9)]
    packed = torch.cat(samples)
    offsets = torch.tensor([0, 5, 6, 18, 18, 27])
    padded = torch.zeros((5, 12), dtype=torch.uint8)
    for row, sample in enumerate(samples):
        padded[row, :len(sample)] = sample
    lengths = torch.tensor([len(s) for s in samples])
    with torch.no_grad():
        flat = next_token_loss(model(packed, offsets=offsets), packed, offsets=offsets,
                               reduction="none")
        rows = next_token_loss(model(padded, lengths), padded, lengths, reduction="none")
        for row, sample in enumerate(samples):  # positions restart, nothing crosses samples
            start = int(offsets[row])
            assert torch.allclose(flat[start:start + len(sample)], rows[row, :len(sample)],
                                  atol=1e-5)
        assert next_token_loss(model(packed, offsets=offsets), packed, offsets=offsets) \
            .item() == pytest.approx(next_token_loss(model(padded), padded, lengths).item(),
                                     rel=1e-5)
    changed = packed.clone()
    changed[18:] = random_tokens(9, seed=99)  # the last sample cannot reach the others
    with torch.no_grad():
        assert torch.allclose(model(packed, offsets=offsets)[:18],
                              model(changed, offsets=offsets)[:18], atol=1e-6)


def stdlib_text() -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    return b"".join((root / name).read_bytes()
                    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py"))


def test_a_few_steps_on_python_sources_lower_the_loss(one_compute_thread):
    data = torch.from_numpy(np.frombuffer(stdlib_text(), dtype=np.uint8).copy())
    generator = torch.Generator().manual_seed(0)

    def windows(count: int) -> torch.Tensor:
        starts = torch.randint(0, len(data) - 64, (count,), generator=generator)
        return torch.stack([data[s:s + 64] for s in starts.tolist()])

    model = small_model()
    probe = windows(64)
    with torch.no_grad():
        before = next_token_loss(model(probe), probe).item()
    assert before == pytest.approx(math.log(256), abs=0.1)  # about uniform at the start
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(80):
        batch = windows(16)
        loss = next_token_loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = next_token_loss(model(probe), probe).item()
    assert after < before - 2.5
    assert after < unigram_entropy(data) - 0.2  # context is used: better than bytes alone


def test_unigram_entropy_in_nats():
    assert unigram_entropy(bytes(range(256)) * 3) == pytest.approx(math.log(256))
    assert unigram_entropy(b"aaaa") == 0.0
    # p = (1/2, 1/4, 1/4): 1.5 bits
    assert unigram_entropy(b"aabc") == pytest.approx(1.5 * math.log(2))
    # chunks are counted together, any integer array or tensor works
    assert unigram_entropy([b"aa", np.array([98]), torch.tensor([99], dtype=torch.uint8)]) \
        == pytest.approx(1.5 * math.log(2))
    with pytest.raises(ArgumentError, match=r"needs at least one byte"):
        unigram_entropy(b"")
    with pytest.raises(ArgumentError, match=r"byte values 0..255, got values from 0 to 300"):
        unigram_entropy(np.array([0, 300]))
    with pytest.raises(ArgumentTypeError, match=r"bytes or integer arrays .* got float"):
        unigram_entropy([1.5])


def test_built_in_and_checked_like_the_other_models():
    model = models.build_model("bytelm", {"d_model": 16, "layers": 1, "heads": 2},
                               input_shape=(), outputs=None)
    assert isinstance(model, ByteLM) and len(model.blocks) == 1
    assert models.check_option("bytelm", "heads", 0) == "expected a positive integer, got 0"
    assert models.check_option("bytelm", "d_model", 64) is None
    assert models.check_option("bytelm", "dropout", 1.5) == \
        "expected a number in [0, 1), got 1.5"
    with pytest.raises(ArgumentError, match=r"d_model must be a multiple of 2 \* heads .* "
                                            r"d_model=30, heads=4"):
        models.build_model("bytelm", {"d_model": 30, "heads": 4}, input_shape=(),
                           outputs=None)
    with pytest.raises(ArgumentError, match=r"bytelm layers must be a positive int, got 0"):
        ByteLM(layers=0)


def test_bad_batches_are_refused_with_the_shapes():
    model = small_model()
    with pytest.raises(ArgumentError, match=r"offsets must be non-decreasing cu_seqlens from 0 "
                                            r"to len\(tokens\)=6, got \[0, 4\]"):
        model(random_tokens(6), offsets=torch.tensor([0, 4]))
    with pytest.raises(ArgumentError, match=r"tokens must be a padded \(B, L\) batch .* "
                                            r"got shape \(6,\)"):
        model(random_tokens(6))
    with pytest.raises(ArgumentError, match=r"reduction must be 'mean', 'sum' or 'none'"):
        next_token_loss(torch.zeros(1, 2, 256), torch.zeros(1, 2), reduction="avg")


def _step_peak(model: ByteLM, batch: int, length: int) -> int:
    """Bytes one training step on a ``(batch, length)`` batch needs beyond what was allocated
    before it (gradients included: they are set to None before each step)."""
    device = torch.device("cuda")
    model.zero_grad(set_to_none=True)
    tokens = torch.randint(0, 256, (batch, length), device=device, dtype=torch.uint8)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    next_token_loss(model(tokens), tokens).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_peaks_follow_the_shape_cost_model():
    from gpuloader.costmodel import ShapeCostModel

    torch.manual_seed(0)
    model = ByteLM(d_model=256, layers=4, heads=4).cuda()
    _step_peak(model, 2, 64)  # warm-up: kernels and workspaces of the first step
    cost = ShapeCostModel()
    for batch, length in [(b, n) for n in (128, 512, 2048) for b in (1, 4, 16)]:
        cost.observe(batch, length, _step_peak(model, batch, length))
    for batch, length in ((8, 1024), (2, 3072), (32, 256)):  # shapes it has not seen
        measured = _step_peak(model, batch, length)
        assert cost.predict(batch, length) == pytest.approx(measured, rel=0.25), \
            (batch, length, cost.learned)
    budget = 2 << 30
    for length in (256, 1024, 3072):  # planned batches fit the budget they were planned for
        size = cost.max_batch(length, budget)
        assert size >= 1 and _step_peak(model, size, length) <= budget * 1.1
