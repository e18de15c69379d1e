"""DataLoader on ragged fields: token budgets, padding/packing, length buckets, exactly once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gpuloader as gl  # noqa: E402
from gpuloader.batching import padding_efficiency  # noqa: E402


def corpus(n=300, seed=0, mean_log=3.0, max_len=400):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean_log, 1.0, n), 0, max_len).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    values = rng.integers(1, 30000, int(offsets[-1])).astype(np.int16)
    return values, offsets, lengths


@pytest.fixture(scope="module")
def data():
    values, offsets, lengths = corpus()
    ds = gl.ArrayDataset(tokens=gl.Ragged(values, offsets), y=np.arange(len(lengths)))
    return ds, values, offsets, lengths


def check_padded(batch, values, offsets, *, pad=0, multiple=1):
    tokens, lens, ys = batch["tokens"], batch["tokens_lengths"], batch["y"]
    assert tokens.shape[0] == len(ys) == len(lens) and lens.dtype == torch.int64
    assert tokens.shape[1] % multiple == 0 and tokens.shape[1] - multiple < max(int(lens.max()), 1)
    for k, i in enumerate(ys.tolist()):
        n = int(lens[k])
        assert n == offsets[i + 1] - offsets[i]
        assert torch.equal(tokens[k, :n], torch.from_numpy(values[offsets[i]:offsets[i + 1]]))
        assert (tokens[k, n:] == pad).all()
    return ys.tolist()


def test_padded_batches_fit_the_budget_and_cover_the_epoch(data):
    ds, values, offsets, lengths = data
    loader = gl.DataLoader(ds, max_tokens=600, shuffle=True, seed=3, pad_value=-7,
                           pad_to_multiple_of=8)
    assert loader.max_tokens == 600 and loader.batch_size is None
    seen, batches = [], 0
    for batch in loader:
        b, length = batch["tokens"].shape
        assert b * length <= 600 or b == 1
        seen += check_padded(batch, values, offsets, pad=-7, multiple=8)
        batches += 1
    assert sorted(seen) == list(range(len(lengths)))
    assert batches == len(loader)
    stats = loader.stats()
    assert stats["max_tokens"] == 600 and stats["samples"] == len(lengths)


def test_over_long_samples_travel_alone(data):
    ds, values, offsets, lengths = data
    budget = int(np.sort(lengths)[-5])  # the 4 longest exceed it
    loader = gl.DataLoader(ds, max_tokens=budget, shuffle=True, seed=1)
    alone = {int(b["y"][0]) for b in loader if len(b["y"]) == 1}
    assert {int(i) for i in np.flatnonzero(lengths > budget)} <= alone


def test_packed_batches_are_cu_seqlens(data):
    ds, values, offsets, lengths = data
    seen = []
    for batch in gl.DataLoader(ds, max_tokens=500, packed=True, shuffle=True, seed=2):
        cu, ys = batch["tokens_offsets"], batch["y"].tolist()
        assert cu.dtype == torch.int64 and len(cu) == len(ys) + 1 and cu[0] == 0
        assert batch["tokens"].ndim == 1 and cu[-1] == len(batch["tokens"])
        for k, i in enumerate(ys):
            assert torch.equal(batch["tokens"][cu[k]:cu[k + 1]],
                               torch.from_numpy(values[offsets[i]:offsets[i + 1]]))
        seen += ys
    assert sorted(seen) == list(range(len(lengths)))


def test_batch_size_caps_samples_and_sequential_keeps_storage_order(data):
    ds, values, offsets, lengths = data
    loader = gl.DataLoader(ds, max_tokens=10**6, batch_size=7)
    assert loader.batch_size == 7
    ys = [b["y"].tolist() for b in loader]
    assert all(len(b) <= 7 for b in ys) and sum(ys, []) == list(range(len(lengths)))


def test_fixed_batch_size_pads_without_a_budget(data):
    ds, values, offsets, lengths = data
    batches = list(gl.DataLoader(ds, batch_size=16))
    assert [len(b["y"]) for b in batches[:-1]] == [16] * (len(batches) - 1)
    seen = sum((check_padded(b, values, offsets) for b in batches), [])
    assert seen == list(range(len(lengths)))


def test_positional_dataset_and_subset(data):
    _, values, offsets, lengths = data
    ds = gl.ArrayDataset(gl.Ragged(values, offsets), np.arange(len(lengths)))
    batch = next(iter(gl.DataLoader(ds, max_tokens=300)))
    assert isinstance(batch, list) and len(batch) == 3 and batch[1].dtype == torch.int64
    sub = torch.utils.data.Subset(gl.ArrayDataset(tokens=gl.Ragged(values, offsets),
                                                  y=np.arange(len(lengths))), range(10, 60))
    got = []
    for b in gl.DataLoader(sub, max_tokens=300, shuffle=True, seed=0):
        got += check_padded(b, values, offsets)
    assert sorted(got) == list(range(10, 60))


def test_buckets_are_efficient_random_and_deterministic():
    values, offsets, lengths = corpus(n=6000, mean_log=4.0, max_len=2000)
    ds = gl.ArrayDataset(tokens=gl.Ragged(values, offsets))
    loader = gl.DataLoader(ds, max_tokens=4096, shuffle=True, seed=5)
    batches = [b["tokens_lengths"] for b in loader]
    real = sum(int(b.sum()) for b in batches)
    padded = sum(len(b) * int(b.max()) for b in batches)
    assert real / padded >= 0.9
    fixed = np.minimum(np.arange(32, len(lengths) + 32, 32), len(lengths))
    assert padding_efficiency(lengths[np.random.default_rng(0).permutation(len(lengths))],
                              fixed) < 0.5
    means = np.array([float(b.double().mean()) for b in batches])
    r = np.corrcoef(np.arange(len(means)), means)[0, 1]
    assert abs(r) < 4 / np.sqrt(len(means))  # batch order stays random
    again = [b["tokens_lengths"] for b in gl.DataLoader(ds, max_tokens=4096, shuffle=True,
                                                        seed=5)]
    assert all(torch.equal(a, b) for a, b in zip(batches, again)) and len(again) == len(batches)
    loader.set_epoch(1)
    assert [len(b["tokens_lengths"]) for b in loader] != [len(b) for b in batches]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), order=st.sampled_from(["shuffle", "sequential", "block"]),
       budget=st.integers(40, 900),
       actions=st.lists(st.sampled_from(["ok", "ok", "ok", "oom", "resume", "break"]),
                        min_size=1, max_size=40))
def test_exactly_once_under_oom_break_and_resume(data, seed, order, budget, actions):
    ds, values, offsets, lengths = data
    n = len(lengths)

    def make():
        return gl.DataLoader(ds, max_tokens=budget, order=order, seed=seed)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    loader = make()
    it = iter(loader)
    delivered = []
    last_budget = loader.max_tokens
    for action in actions + ["ok"] * (4 * n):
        try:
            batch = next(it)
        except StopIteration:
            break
        ys = batch["y"].tolist()
        if action == "oom" and len(ys) > 1:
            with loader.oom_guard(optimizer) as guard:
                raise torch.cuda.OutOfMemoryError("simulated")
            assert guard.failed and loader.max_tokens < last_budget
            last_budget = loader.max_tokens
            continue
        delivered += ys
        if action == "resume":
            state = loader.state_dict()
            loader.close()
            loader = make()
            loader.load_state_dict(state)
            assert loader.max_tokens == last_budget
            it = iter(loader)
        elif action == "break":
            del it
            loader.load_state_dict(loader.state_dict())
            it = iter(loader)
    assert sorted(delivered) == list(range(n))
    loader.close()


def test_resume_reproduces_the_remaining_batches(data):
    ds, *_ = data
    full = [b["y"].tolist() for b in gl.DataLoader(ds, max_tokens=500, shuffle=True, seed=9)]
    loader = gl.DataLoader(ds, max_tokens=500, shuffle=True, seed=9)
    it = iter(loader)
    head = [next(it)["y"].tolist() for _ in range(5)]
    state = loader.state_dict()
    assert state["tokens"] == {"plan_tokens": 500}
    again = gl.DataLoader(ds, max_tokens=500, shuffle=True, seed=1)
    again.load_state_dict(state)
    assert head + [b["y"].tolist() for b in again] == full


def test_errors_name_the_option(data):
    ds, values, offsets, _ = data
    fixed = gl.ArrayDataset(x=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"max_tokens=64 needs a dataset with a variable-length"):
        gl.DataLoader(fixed, max_tokens=64)
    with pytest.raises(ValueError, match=r"packed=True needs"):
        gl.DataLoader(fixed, packed=True)
    with pytest.raises(TypeError, match="max_tokens must be a positive int or None, got float 1.5"):
        gl.DataLoader(ds, max_tokens=1.5)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int, got 0"):
        gl.DataLoader(ds, max_tokens=8, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match=r"pad_value=70000 cannot be stored in ragged field "
                                         r"'tokens' of dtype int16"):
        gl.DataLoader(ds, max_tokens=8, pad_value=70000)
    with pytest.raises(ValueError, match=r"token_bytes=8 sizes batch_size=\"auto\""):
        gl.DataLoader(ds, max_tokens=8, token_bytes=8)
    with pytest.raises(ValueError, match="token_bytes must be an int >= 0.*got -1"):
        gl.DataLoader(ds, batch_size="auto", token_bytes=-1)
    with pytest.raises(ValueError, match="collate_fn cannot be combined with ragged fields"):
        gl.DataLoader(ds, max_tokens=8, collate_fn=lambda b: b)
    with pytest.raises(ValueError, match="accumulate.*max_tokens"):
        next(gl.DataLoader(ds, max_tokens=100).accumulate(8))


def test_a_single_sample_that_does_not_fit_is_an_error(data):
    ds, *_ = data
    loader = gl.DataLoader(ds, max_tokens=1)  # every batch is one sample
    next(iter(loader))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        with loader.oom_guard(optimizer):
            raise torch.cuda.OutOfMemoryError("simulated")
    assert "max_tokens cannot split it further" in "".join(getattr(info.value, "__notes__", []))


@pytest.mark.cuda
def test_ragged_batches_on_cuda_are_views_of_preallocated_slots(data):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ds, values, offsets, lengths = data
    loader = gl.DataLoader(ds, max_tokens=600, shuffle=True, seed=4, device="cuda",
                           reuse_buffers=True)
    seen = []
    for batch in loader:
        assert batch["tokens"].is_cuda
        seen += check_padded({k: v.cpu() for k, v in batch.items()}, values, offsets)
    assert sorted(seen) == list(range(len(lengths)))
    res = loader._fast.resources
    before = {k: t.data_ptr() for k, t in res.device_ring.slots[0].tensors.items()}
    list(loader)
    assert {k: t.data_ptr() for k, t in res.device_ring.slots[0].tensors.items()} == before


def test_staged_ragged_batches_are_views_of_slots_sized_once(data):
    """The CUDA staging path on the CPU, with test_buffers' stand-in for torch.cuda: host and
    device slots are allocated once for the token budget, each batch copies only the rows it
    uses, and delivered batches are shaped views equal to the source samples."""
    from test_buffers import FakeCuda

    from gpuloader import buffers
    from gpuloader.fastpath import FastEpochIterator, FastResources
    from gpuloader.padding import LayoutSource
    from gpuloader.readers import ReaderPool
    from gpuloader.sizing import SizeController
    from gpuloader.stats import LoaderStats
    from gpuloader.tokens import RaggedWiring

    ds, values, offsets, lengths = data
    wiring = RaggedWiring.build(ds, gl.DataLoader(ds, batch_size=2)._view, batch_size=1,
                                sampler=None, batch_sampler=None, collate_fn=None,
                                max_tokens=512, pad_value=0, pad_to_multiple_of=1,
                                packed=False, bucket_window=None)
    fields = wiring.layout.buffer_fields()
    source = LayoutSource(ds.source, wiring.layout)
    stats = LoaderStats()
    host = buffers.HostRing(fields, wiring.capacity, 3, pin=False)
    ring = buffers.DeviceRing(fields, wiring.capacity, 3, torch.device("cpu"), cuda=FakeCuda())
    slot_ptrs = {id(s): {k: t.data_ptr() for k, t in s.tensors.items()} for s in ring.slots}
    res = FastResources(source=source, fields=fields, index_map=None, pack=dict,
                        pool=ReaderPool(source, 2, stats), stats=stats,
                        sizing=SizeController(512), prefetch_depth=1,
                        device=torch.device("cpu"), host_ring=host, device_ring=ring,
                        layout=wiring.layout, tokens=wiring.epochs)
    order, ends = wiring.epochs.plan("shuffle", seed=0, epoch=0, rank=0, world_size=1,
                                     drop_last=False, block_length=1)
    it = FastEpochIterator(res, 0, order, 0, sort=True, drop_last=False, boundaries=ends,
                           order_lengths=wiring.epochs.lengths[order])
    seen = []
    try:
        for batch in it:
            ptr = batch["tokens"].data_ptr()
            assert any(ptr == p["tokens"] for p in slot_ptrs.values())  # a view of a slot
            seen += check_padded({k: v.clone() for k, v in batch.items()}, values, offsets)
    finally:
        res.pool.close()
    assert sorted(seen) == list(range(len(lengths)))
    assert {id(s): {k: t.data_ptr() for k, t in s.tensors.items()}
            for s in ring.slots} == slot_ptrs  # nothing reallocated
