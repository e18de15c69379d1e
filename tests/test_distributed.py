"""distributed=True: disjoint shards, agreed batch sizes, OOM rollback on every rank, resume.

The multi-process checks run once per session: two spawned processes join a gloo process group
(a FileStore in a temporary folder, no TCP port), run every scenario below in the same order,
and write what they saw to ``rank<r>.json``.  The tests then compare the two ranks.  A hang
fails instead of blocking: the process group has a short timeout and the parent kills the
workers after ``JOIN_TIMEOUT`` seconds.
"""
from __future__ import annotations

import json
import multiprocessing
import traceback
from collections import Counter
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

import gpuloader as gl
from gpuloader.errors import ArgumentError
from gpuloader.planning import plan_batch_size
from gpuloader.probes import MemoryInfo, MemoryProbe
from gpuloader.order import epoch_order
from gpuloader.sizing import INITIAL_COOLDOWN, SizeController
from gpuloader.world import World

WORLD_SIZE = 2
JOIN_TIMEOUT = 150.0   # seconds for the whole two-process session
GROUP_TIMEOUT = 30     # seconds a collective may wait before it raises

#: Collectives this process ran through a RecordingWorld, in order ("MIN" / "MAX").
LOG: List[str] = []


class RecordingWorld(World):
    """A World that logs each collective it runs (built directly, per DESIGN.md)."""

    def _reduce(self, value: int, op: str) -> int:
        result = super()._reduce(value, op)
        LOG.append(op)
        return result


class Numbers(Dataset):
    """A plain map-style dataset (generic path): sample i is the int i."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return int(i)


def make_dataset(n: int) -> gl.ArrayDataset:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return gl.ArrayDataset(x=x, y=np.arange(n, dtype=np.int64))


def flat(batches: List[List[int]]) -> List[int]:
    return [i for batch in batches for i in batch]


# ---------------------------------------------------------------------------------- scenarios
# Each runs on every rank (a collective program) and returns JSON-able data.

def scenario_shards(rank: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for drop_last in (False, True):
        for batch_size in (3, 5):
            with gl.DataLoader(make_dataset(11), batch_size=batch_size, shuffle=True, seed=7,
                               drop_last=drop_last, distributed=True,
                               reader_threads=1) as loader:
                epochs = []
                for epoch in (0, 1):
                    loader.set_epoch(epoch)
                    epochs.append([b["y"].tolist() for b in loader])
                out[f"{drop_last}-{batch_size}"] = {"len": len(loader), "epochs": epochs}
    with gl.DataLoader(Numbers(11), batch_size=4, shuffle=True, seed=7,
                       distributed=True) as loader:
        out["generic"] = {"len": len(loader), "epochs": [[b.tolist() for b in loader]]}
    torch.manual_seed(100 + rank)  # ranks seeded differently, no seed= given
    with gl.DataLoader(make_dataset(11), batch_size=4, shuffle=True, distributed=True,
                       reader_threads=1) as loader:
        out["drawn-seed"] = {"len": len(loader), "epochs": [[b["y"].tolist() for b in loader]],
                             "seed": loader.seed}
    return out


AUTO_BUDGETS = (1 << 16, 1 << 18)  # rank 0 has the least memory


def scenario_auto(rank: int) -> Dict[str, Any]:
    with gl.DataLoader(make_dataset(4096), batch_size="auto", memory_budget=AUTO_BUDGETS[rank],
                       distributed=True, reader_threads=1) as loader:
        local = plan_batch_size(loader._sizing.free(), loader._sizing.config)
        sizes = [len(b["y"]) for b in loader]
        return {"batch_size": loader.batch_size, "local": local, "sizes": sizes,
                "len": len(loader)}


OOM_N = 5200
OOM_STEP = 2
PROBE_BUDGET = 1 << 30


class GrowingProbe(MemoryProbe):
    """Rank 0's free-memory probe reports ever more free memory; rank 1's never changes.

    So after the out-of-memory error the two ranks' own growth candidates differ (rank 0
    forgets the failed size, rank 1 bisects towards it): only agreement keeps them in step.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.calls = 0

    def read(self) -> MemoryInfo:
        self.calls += 1
        free = PROBE_BUDGET * (4 ** self.calls if self.rank == 0 else 1)
        return MemoryInfo(free=free, total=free, source="test")


def scenario_oom(rank: int) -> Dict[str, Any]:
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    sizes: List[int] = []
    failed: List[bool] = []
    ops: List[List[str]] = []
    trained: List[int] = []
    with gl.DataLoader(make_dataset(OOM_N), batch_size="auto", max_batch_size=64, shuffle=True,
                       seed=11, distributed=True, reader_threads=1) as loader:
        loader._sizing.free.probe = GrowingProbe(rank)
        loader.world = RecordingWorld(loader.world.rank, loader.world.world_size, True)
        for step, batch in enumerate(loader):
            sizes.append(len(batch["y"]))
            before = len(LOG)
            with loader.oom_guard(optimizer) as guard:
                loss = (batch["x"] @ param).sum()
                if rank == 1 and step == OOM_STEP:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, rank 1)")
                loss.backward()
            if not guard.failed:  # a rolled-back step trained nothing, on every rank
                trained.extend(batch["y"].tolist())
            failed.append(guard.failed)
            ops.append(LOG[before:])
        return {"sizes": sizes, "failed": failed, "ops": ops, "trained": trained,
                "batch_size": loader.batch_size}


RESUME_N = 103


def scenario_resume(rank: int) -> Dict[str, Any]:
    def loader_(seed: int) -> gl.DataLoader:
        return gl.DataLoader(make_dataset(RESUME_N), batch_size=8, shuffle=True, seed=seed,
                             distributed=True, reader_threads=1)

    first: List[int] = []
    with loader_(5) as loader:
        loader.set_epoch(1)
        iterator = iter(loader)
        for step in range(4):
            batch = next(iterator)
            with loader.oom_guard() as guard:
                if rank == 0 and step == 1:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, rank 0)")
            if not guard.failed:
                first.extend(batch["y"].tolist())
        state = loader.state_dict()
    state = json.loads(json.dumps(state))  # as a checkpoint would store it
    with loader_(99) as resumed:  # the state brings its own seed
        resumed.load_state_dict(state)
        rest = [b["y"].tolist() for b in resumed]
    # The common DDP pattern: rank 0 saves, every rank loads rank 0's checkpoint.
    shared = [state if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    with loader_(99) as resumed:
        resumed.load_state_dict(shared[0])
        rest_from_rank0 = [b["y"].tolist() for b in resumed]
    return {"first": first, "rest": rest, "rest_from_rank0": rest_from_rank0, "state": state}


def scenario_accelerate(rank: int) -> Dict[str, Any]:
    """What accelerate's prepare() reads (NOTE(accelerate)): keep a loader that shards itself,
    warn once about one that does not (no collectives here)."""
    import warnings

    out: Dict[str, Any] = {}
    for distributed in (True, False):
        with gl.DataLoader(make_dataset(8), batch_size=2, distributed=distributed,
                           device="cpu") as loader, warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            flags = [loader._is_accelerate_prepared, loader._is_accelerate_prepared]
            out[str(distributed)] = {"flags": flags, "warnings": [str(w.message) for w in got]}
    return out


TOKENS_N = 157


def ragged_dataset() -> gl.ArrayDataset:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.0, 1.0, TOKENS_N), 1, 300).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    return gl.ArrayDataset(tokens=gl.Ragged(np.zeros(int(offsets[-1]), np.int32), offsets),
                           y=np.arange(TOKENS_N, dtype=np.int64))


def scenario_tokens(rank: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for drop_last in (False, True):
        with gl.DataLoader(ragged_dataset(), max_tokens=256, shuffle=True, seed=3,
                           drop_last=drop_last, distributed=True, reader_threads=1) as loader:
            batches = [{"y": b["y"].tolist(), "shape": list(b["tokens"].shape)} for b in loader]
            out[str(drop_last)] = {"len": len(loader), "batches": batches}
    return out


def scenario_tokens_oom(rank: int) -> Dict[str, Any]:
    """Out-of-memory on rank 1 only, twice: every rank shrinks and splits alike (equal steps)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    failed: List[bool] = []
    trained: List[int] = []
    with gl.DataLoader(ragged_dataset(), max_tokens=256, shuffle=True, seed=3,
                       distributed=True, reader_threads=1) as loader:
        for step, batch in enumerate(loader):
            with loader.oom_guard(optimizer) as guard:
                if rank == 1 and step in (1, 4) and len(batch["y"]) > 1:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, rank 1)")
            if not guard.failed:
                trained.extend(batch["y"].tolist())
            failed.append(guard.failed)
        return {"failed": failed, "trained": trained, "max_tokens": loader.max_tokens}


AUTO_N = 600
AUTO_BUDGETS = (120_000, 180_000)  # memory_budget per rank: they plan different max_tokens


def scenario_auto_tokens(rank: int) -> Dict[str, Any]:
    """batch_size="auto" + token_bytes, a different memory budget per rank, step peaks
    reported as on CUDA (the recording stand-in) so each rank learns its own shape caps:
    epoch 0 without errors, epoch 1 with an out-of-memory error on rank 1 only."""
    from cuda_standin import FakeCuda
    from gpuloader.allocator import StepMemory
    from simulated_memory import SimulatedMemory

    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(3.0, 1.0, AUTO_N), 1, 300).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    ds = gl.ArrayDataset(tokens=gl.Ragged(np.zeros(int(offsets[-1]), np.int16), offsets),
                         y=np.arange(AUTO_N, dtype=np.int64))
    make = lambda distributed: gl.DataLoader(  # noqa: E731
        ds, batch_size="auto", token_bytes=200, memory_budget=AUTO_BUDGETS[rank], shuffle=True,
        seed=5, distributed=distributed, reader_threads=1)
    with make(False) as alone:
        own = alone.max_tokens
    sim = SimulatedMemory(limit=1 << 40, per_token=100, per_token_length=4)
    fake = FakeCuda()
    fake.stats = {"allocated_bytes.all.current": 0, "allocated_bytes.all.peak": 0}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    out: Dict[str, Any] = {"own": own, "epochs": []}
    with make(True) as loader:
        loader._memory = StepMemory(torch.device("cuda", 0), learn=True, cuda=fake)
        out["first"] = loader.max_tokens
        for epoch in range(2):
            loader.set_epoch(epoch)
            order, _ = loader._tokens.plan_epoch(loader._order, epoch)
            steps: List[List[Any]] = []
            trained: List[int] = []
            for step, batch in enumerate(loader):
                b, length = batch["tokens"].shape
                with loader.oom_guard(optimizer) as guard:
                    if epoch == 1 and rank == 1 and step >= 3 and b >= 4 and "caps" not in out:
                        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
                    fake.stats["allocated_bytes.all.peak"] = sim.step(int(b), int(length))
                steps.append([int(b), int(length), guard.failed])
                if guard.failed:  # the samples each rank plans at a length, right after
                    out["caps"] = {str(n): r.good
                                   for n, r in loader._tokens.planner._records.items()}
                else:
                    trained.extend(batch["y"].tolist())
            out["epochs"].append({"planned": len(loader), "steps": steps, "trained": trained,
                                  "shard": sorted(order.tolist())})
        out["last"] = loader.max_tokens
        out["learned"] = loader._tokens.planner.cost_model.learned is not None
    return out


SCENARIOS: Dict[str, Callable[[int], Dict[str, Any]]] = {
    "shards": scenario_shards,
    "auto": scenario_auto,
    "oom": scenario_oom,
    "resume": scenario_resume,
    "accelerate": scenario_accelerate,
    "tokens": scenario_tokens,
    "tokens_oom": scenario_tokens_oom,
    "auto_tokens": scenario_auto_tokens,
}


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=GROUP_TIMEOUT))
    results: Dict[str, Any] = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank)
            except Exception:  # record it; later scenarios' collectives may not match: stop
                results[name] = {"error": traceback.format_exc()}
                break
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> List[Dict[str, Any]]:
    """What each of the two ranks saw, per scenario (run once for this module)."""
    folder = tmp_path_factory.mktemp("distributed")
    store = folder / "filestore"
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, args=(r, str(store), str(folder)),
                             name=f"gpuloader-test-rank{r}") for r in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    hung = []
    for p in procs:
        p.join(JOIN_TIMEOUT)
        if p.is_alive():
            hung.append(p.name)
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"distributed workers {hung} did not finish within {JOIN_TIMEOUT} s")
    out = []
    for r, p in enumerate(procs):
        path = folder / f"rank{r}.json"
        if not path.exists():
            pytest.fail(f"rank {r} exited with code {p.exitcode} and wrote no results")
        out.append(json.loads(path.read_text()))
    return out


def results(ranks: List[Dict[str, Any]], name: str) -> List[Dict[str, Any]]:
    got = []
    for r, res in enumerate(ranks):
        if name not in res:
            pytest.fail(f"rank {r} did not run scenario {name!r} (an earlier one failed)")
        if "error" in res[name]:
            pytest.fail(f"rank {r}, scenario {name!r}:\n{res[name]['error']}")
        got.append(res[name])
    return got


# ---------------------------------------------------------------------------------- sharding

def test_token_budget_rollbacks_keep_ranks_in_step_and_samples_once(ranks):
    got = results(ranks, "tokens_oom")
    plain = [r["False"]["batches"] for r in results(ranks, "tokens")]
    assert len(got[0]["failed"]) == len(got[1]["failed"])  # equal steps, rollbacks included
    assert got[0]["failed"] == got[1]["failed"] and sum(got[0]["failed"]) >= 1
    assert got[0]["max_tokens"] == got[1]["max_tokens"] < 256
    for r in range(WORLD_SIZE):  # each rank's shard, exactly once
        assert sorted(got[r]["trained"]) == sorted(i for b in plain[r] for i in b["y"])


def test_auto_token_budgets_agree_across_ranks_and_survive_an_oom_on_one(ranks):
    got = results(ranks, "auto_tokens")
    own = [r["own"] for r in got]
    assert own[0] != own[1]  # the budgets differ, so do the plans made alone ...
    assert got[0]["first"] == got[1]["first"] == min(own)  # ... the shared one is the least
    assert got[0]["last"] == got[1]["last"] and all(r["learned"] for r in got)
    for epoch in range(2):
        runs = [r["epochs"][epoch] for r in got]
        assert runs[0]["planned"] == runs[1]["planned"]  # the same plan: equal planned batches
        steps = [r["steps"] for r in runs]
        assert len(steps[0]) == len(steps[1]) > runs[0]["planned"]  # caps split, in step
        assert [s[2] for s in steps[0]] == [s[2] for s in steps[1]]  # rolled back together
        for run in runs:  # each rank's shard exactly once, rollbacks included
            assert sorted(run["trained"]) == run["shard"]
        assert set(runs[0]["shard"]) | set(runs[1]["shard"]) == set(range(AUTO_N))
    failed = [s[2] for s in got[0]["epochs"][1]["steps"]]
    assert failed.count(True) == 1 and failed.index(True) >= 3
    for r in got:  # both ranks' plans shrink: at most half the failed batch at its length
        b, length, _ = r["epochs"][1]["steps"][failed.index(True)]
        assert r["caps"][str(length)] <= max(1, b // 2), (b, length, r["caps"])


@pytest.mark.parametrize("drop_last", ["False", "True"])
def test_token_batches_are_planned_globally_so_ranks_step_equally(ranks, drop_last):
    got = [r[drop_last] for r in results(ranks, "tokens")]
    counts = [len(r["batches"]) for r in got]
    assert counts[0] == counts[1] == got[0]["len"] == got[1]["len"] > 0
    for r in got:
        for b in r["batches"]:
            assert b["shape"][0] * b["shape"][1] <= 256 or b["shape"][0] == 1
    seen = [[i for b in r["batches"] for i in b["y"]] for r in got]
    if drop_last == "True":
        assert not set(seen[0]) & set(seen[1])  # disjoint
    else:
        assert set(seen[0]) | set(seen[1]) == set(range(TOKENS_N))  # every sample somewhere



@pytest.mark.parametrize("key", ["False-3", "False-5", "True-3", "True-5", "generic",
                                 "drawn-seed"])
def test_shards_are_disjoint_cover_the_dataset_and_have_equal_batch_counts(ranks, key):
    r0, r1 = (res[key] for res in results(ranks, "shards"))
    n, drop_last = 11, key.startswith("True")
    seed = r0.get("seed", 7)
    assert r1.get("seed", 7) == seed  # a seed drawn per rank is agreed
    for e, (b0, b1) in enumerate(zip(r0["epochs"], r1["epochs"])):
        assert len(b0) == len(b1) == r0["len"] == r1["len"]  # same step count on every rank
        counts = Counter(flat(b0) + flat(b1))
        if drop_last and key == "True-5":  # whole shards delivered: 5 + 5, one index dropped
            assert len(counts) == 10 and set(counts.values()) == {1}
        elif drop_last:  # shards of 5, batches of 3: the short batch is dropped too
            assert len(b0[0]) == 3 and len(counts) == 6 and set(counts.values()) == {1}
        else:  # padded like DistributedSampler: all 11 indices, the order's first one twice
            assert set(counts) == set(range(n)) and sum(counts.values()) == 12
            full = epoch_order("shuffle", n, seed=seed, epoch=e)
            assert counts[int(full[0])] == 2
        for r, b in enumerate((b0, b1)):  # each rank reads its own slice of the epoch's order
            shard = epoch_order("shuffle", n, seed=seed, epoch=e, rank=r, world_size=2,
                                drop_last=drop_last)
            assert set(flat(b)) <= set(shard.tolist())
    if len(r0["epochs"]) > 1:
        assert r0["epochs"][0] != r0["epochs"][1]  # set_epoch reshuffles


def test_distributed_sampler_as_sampler_keeps_working():
    n = 11
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(make_dataset(n), num_replicas=2, rank=rank, shuffle=True,
                                     seed=3)
        sampler.set_epoch(2)
        expected = [b["y"].tolist() for b in torch.utils.data.DataLoader(
            make_dataset(n), batch_size=4, sampler=sampler)]
        with gl.DataLoader(make_dataset(n), batch_size=4, sampler=sampler) as loader:
            loader.set_epoch(2)
            got = [b["y"].tolist() for b in loader]
        assert got == expected
        seen.extend(flat(got))
    assert set(seen) == set(range(n)) and len(seen) == 12


def test_distributed_without_a_process_group_is_refused():
    with pytest.raises(ArgumentError, match="init_process_group"):
        gl.DataLoader(make_dataset(8), batch_size=2, distributed=True)


# ---------------------------------------------------------------------------------- agreement

def test_auto_batch_size_is_the_smallest_any_rank_can_hold(ranks):
    r0, r1 = results(ranks, "auto")
    assert r0["local"] < r1["local"]  # the budgets really differ
    assert r0["batch_size"] == r1["batch_size"] == r0["local"]
    assert r0["sizes"] == r1["sizes"] and len(r0["sizes"]) == r0["len"] == r1["len"]


def test_oom_on_one_rank_rolls_back_and_shrinks_every_rank(ranks):
    r0, r1 = results(ranks, "oom")
    assert r0["failed"] == r1["failed"]
    assert [i for i, f in enumerate(r0["failed"]) if f] == [OOM_STEP]
    assert r0["sizes"] == r1["sizes"]  # same size every step, so the same step count
    assert r0["sizes"][OOM_STEP] == 64 and r0["sizes"][OOM_STEP + 1] == 32
    # Nothing lost, nothing repeated: the failed batch was re-delivered on both ranks.
    assert sorted(r0["trained"] + r1["trained"]) == list(range(OOM_N))


def test_growth_is_agreed_at_the_same_steps_on_every_rank(ranks):
    r0, r1 = results(ranks, "oom")
    # Rank 0 alone would jump back to 64; rank 1 (no memory freed) bisects 48 -> 56 -> 64.
    # The agreed sizes follow the rank with the least room.
    grown = [s for s in dict.fromkeys(r0["sizes"][OOM_STEP + 1:])]
    assert grown[:4] == [32, 48, 56, 64]
    assert r0["batch_size"] == r1["batch_size"] == 64
    # Collectives: the guard's flag exactly once per step, first; a size agreement (MIN) only
    # at the OOM and at growth decisions; the same sequence on both ranks.
    assert r0["ops"] == r1["ops"]
    for step, ops in enumerate(r0["ops"]):
        assert ops[0] == "MAX" and ops.count("MAX") == 1 and ops[1:] in ([], ["MIN"]), step
    decisions = [s for s, ops in enumerate(r0["ops"]) if "MIN" in ops and s != OOM_STEP]
    assert len(decisions) >= 3
    assert decisions[0] == OOM_STEP + INITIAL_COOLDOWN  # after a full cooldown of successes
    assert np.all(np.diff(decisions) >= INITIAL_COOLDOWN)


def test_controller_agrees_only_at_growth_decisions():
    calls: List[int] = []

    def agree(candidate: int) -> int:  # another rank can only hold 40
        calls.append(candidate)
        return min(candidate, 40)

    controller = SizeController(64, floor=1, agree=agree)
    for _ in range(3 * INITIAL_COOLDOWN):
        controller.on_success(64)
    assert calls == []  # at the target nothing is decided
    controller.on_oom(64)
    assert controller.current == 32
    for _ in range(INITIAL_COOLDOWN - 1):
        controller.on_success(32)
    assert calls == []
    controller.on_success(32)
    assert calls == [48] and controller.current == 40  # the other rank's bound wins


def test_a_retry_held_back_by_another_rank_keeps_the_known_bad_size():
    bound = [16]
    controller = SizeController(64, floor=1, agree=lambda c: min(c, bound[0]))
    controller.on_oom(24)  # -> 12 -> rounded to 8; known bad: 24
    assert controller.current == 8
    for _ in range(INITIAL_COOLDOWN):
        controller.on_success(8)
    assert controller.current == 16  # own candidate 16 (bisection), agreed 16
    bound[0] = 16
    for _ in range(INITIAL_COOLDOWN):  # own candidate: retry 24; another rank holds 16
        controller.on_success(16)
    assert controller.current == 16
    bound[0] = 1000
    for _ in range(INITIAL_COOLDOWN):  # still retries 24, not a doubling to 32 past it
        controller.on_success(16)
    assert controller.current == 24


# ---------------------------------------------------------------------------------- resume

def test_resume_restores_each_ranks_position(ranks):
    r0, r1 = results(ranks, "resume")
    assert r0["state"]["cursor"]["position"] == r1["state"]["cursor"]["position"] > 0
    # Nothing in the state is per rank but the position, so any rank may load rank 0's.
    assert r0["state"]["order"] == r1["state"]["order"]
    everything = []
    for rank, res in enumerate((r0, r1)):
        shard = epoch_order("shuffle", RESUME_N, seed=5, epoch=1, rank=rank, world_size=2)
        mine = res["first"] + flat(res["rest"])
        assert sorted(mine) == sorted(shard.tolist())  # exactly this rank's shard, once
        assert res["rest_from_rank0"] == res["rest"]  # positions agree across ranks
        everything += mine
    counts = Counter(everything)
    assert set(counts) == set(range(RESUME_N)) and sum(counts.values()) == RESUME_N + 1
    assert len(r0["rest"]) == len(r1["rest"])


def test_resume_with_another_world_size_is_refused(ranks):
    state = results(ranks, "resume")[1]["state"]
    with gl.DataLoader(make_dataset(RESUME_N), batch_size=8, shuffle=True) as loader:
        with pytest.raises(ArgumentError, match=r"world_size=2 .* world_size=1"):
            loader.load_state_dict(state)


def test_accelerate_keeps_sharding_loaders_and_warns_once_about_others(ranks):
    for res in results(ranks, "accelerate"):
        assert res["True"] == {"flags": [True, True], "warnings": []}
        assert res["False"]["flags"] == [False, False]
        (message,) = res["False"]["warnings"]  # once, with the supported pattern
        assert "does not shard itself in a job of 2 processes" in message
        assert "device=accelerator.device and distributed=True" in message


# ------------------------------------------------------------------ control collectives (fake)
# NOTE(control-collectives) in world.py, checked with a stand-in for torch.distributed: an NCCL
# default group on a machine without GPUs.

class FakeDist:
    """The torch.distributed names World uses; records each all_reduce's device and group."""

    class ReduceOp:
        MIN, MAX = "MIN", "MAX"

    def __init__(self, *, gloo: bool = True) -> None:
        self.group = SimpleNamespace(WORLD=object())  # a fresh default group per stand-in
        self.gloo = gloo
        self.made: List[str] = []
        self.reduced: List[tuple] = []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_rank(self) -> int:
        return 1

    def get_world_size(self) -> int:
        return 2

    def get_backend(self, group: Any = None) -> str:
        return "nccl" if group is None else group

    def is_gloo_available(self) -> bool:
        return self.gloo

    def new_group(self, backend: str) -> str:
        self.made.append(backend)
        return backend  # the group "is" its backend name, for get_backend

    def all_reduce(self, t: torch.Tensor, op: str, group: Any = None) -> None:
        self.reduced.append((t.device, group, op))


def test_control_collectives_under_nccl_run_on_the_cpu_over_one_gloo_group():
    fake = FakeDist()
    worlds = [World.detect(True, device=torch.device("cuda", 1), dist=fake) for _ in range(2)]
    assert fake.made == ["gloo"]  # one group per process, shared by every loader
    assert worlds[0].device == torch.device("cuda", 1)
    assert worlds[0].min(5) == 5 and worlds[1].any(True)
    # No CUDA tensor: no pageable host-to-device copy, no .item() waiting for the GPU.
    assert fake.reduced == [(torch.device("cpu"), "gloo", "MIN"),
                            (torch.device("cpu"), "gloo", "MAX")]


def test_nccl_without_gloo_reduces_on_the_loaders_device_not_the_current_one():
    fake = FakeDist(gloo=False)
    world = World.detect(True, device=torch.device("cuda", 1), dist=fake)
    assert fake.made == [] and world.group is None
    # torch.cuda.current_device() is 0 on every rank that did not call set_device.
    assert world.collective_device == torch.device("cuda", 1)


def test_loader_gives_its_device_to_the_world():
    with gl.DataLoader(make_dataset(8), batch_size=2, device="cpu") as loader:
        assert loader.world.device == torch.device("cpu")
