"""``gpuloader train`` on a ragged token field: next-token training of bytelm with token budgets
(batch_size auto with token_bytes, or a fixed max_tokens), per-token loss, metrics, exact
mid-epoch resume, out-of-memory rollbacks, and the config's one-line errors."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

import gpuloader as gl
from gpuloader import train
from gpuloader.bytelm import unigram_entropy
from gpuloader.cli import main
from gpuloader.config import Config, ConfigError, from_dict
from gpuloader.fit import split_rows
from gpuloader.ragged_convert import text_to_tokens

pytestmark = pytest.mark.usefixtures("one_compute_thread")

@pytest.fixture
def corpus(tmp_path: Path, py_sources: Path) -> Path:
    """A few standard-library sources as byte tokens, cut into samples of at most 64 bytes."""
    text_to_tokens(py_sources, tmp_path / "corpus.bin", glob="*.py", max_length=64)
    return tmp_path / "corpus"


def _config(tmp_path: Path, corpus: Path, *overrides: str, name: str = "run") -> Config:
    raw = {
        "data": {"path": str(corpus)},
        "loader": {"device": "cpu", "token_bytes": 20_000, "memory_budget": 20_000_000},
        "model": {"name": "bytelm", "d_model": 32, "layers": 1, "heads": 2},
        "train": {"epochs": 2, "lr": 0.005, "global_tokens": 2048},
        "output": str(tmp_path / name),
    }
    return from_dict(raw, overrides)


def _metrics(cfg: Config) -> List[Dict[str, Any]]:
    lines = (Path(cfg.output) / train.METRICS).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_config_resolves_next_token_training(tmp_path: Path, corpus: Path) -> None:
    cfg = _config(tmp_path, corpus)
    assert cfg.data.inputs == "tokens" and cfg.data.targets is None
    assert cfg.train.global_tokens == 2048 and cfg.train.global_batch_size is None
    auto = _config(tmp_path, corpus, "train.global_tokens=null")  # auto: tokens per step
    assert auto.train.global_tokens == 16384 and auto.train.global_batch_size is None
    prefix = from_dict({"data": {"path": str(corpus) + ".idx"}, "model": "bytelm",
                        "output": str(tmp_path / "o")})  # either file of the pair works too
    assert prefix.data.targets is None


def test_loss_ends_below_unigram_entropy_with_metrics(tmp_path: Path, corpus: Path,
                                                     py_sources: Path) -> None:
    cfg = _config(tmp_path, corpus, "train.val_fraction=0.1", "train.epochs=3")
    records = train.run(cfg)
    data = b"".join(path.read_bytes() for path in sorted(py_sources.glob("*.py")))
    entropy = unigram_entropy(data)
    every = gl.open_dataset(corpus).lengths()
    lengths = every[split_rows(len(every), 0.1, 0).train]
    for record in records:
        for key in ("loss", "loss_per", "tokens", "tokens_per_s", "max_tokens", "oom_count",
                    "unigram_entropy", "recent_loss", "val_loss", "samples", "predictions"):
            assert key in record, key
        assert record["loss_per"] == "token" and record["samples"] == len(lengths)
        assert record["tokens"] == int(lengths.sum())  # every training token, each epoch once
        assert record["predictions"] == int(np.maximum(lengths - 1, 0).sum())
        assert record["unigram_entropy"] == pytest.approx(entropy, rel=1e-12)
        assert record["max_tokens"] <= 2048 and record["oom_count"] == 0
        assert record["tokens_per_s"] > 0
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["loss"] < entropy and records[-1]["val_loss"] < entropy
    assert records[-1]["recent_loss"] < entropy - 0.2
    assert _metrics(cfg) == records


@pytest.mark.parametrize("extra", [
    [],                                                     # auto from memory_budget/token_bytes
    ["loader.batch_size=16", "loader.max_tokens=512",       # a fixed budget, capped samples
     "loader.token_bytes=0", "loader.memory_budget=null"],
    ["train.global_tokens=null", "loader.batch_size=8", "loader.max_tokens=512",
     "loader.token_bytes=0"],                               # one step per batch
])
def test_resume_mid_epoch_gives_the_same_final_loss(tmp_path: Path, corpus: Path,
                                                    extra: List[str]) -> None:
    ref = _config(tmp_path, corpus, *extra, name="ref")
    reference = train.run(ref)
    steps = reference[0]["step"]
    assert steps > 4

    cfg = _config(tmp_path, corpus, *extra)
    first = train.run(cfg, stop=lambda info: info["step"] >= steps + steps // 2)
    assert [r["epoch"] for r in first] == [1]
    state = torch.load(Path(cfg.output) / train.CHECKPOINT, weights_only=True)
    assert 0 < state["loader"]["cursor"]["position"]
    rest = train.run(cfg, resume=True)
    assert [r["epoch"] for r in rest] == [2] and rest[0]["resumed"]
    for got, want in zip(_metrics(cfg), reference):
        assert (got["step"], got["tokens"], got["predictions"]) == (
            want["step"], want["tokens"], want["predictions"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6, rel=0)
        assert got["recent_loss"] == pytest.approx(want["recent_loss"], abs=1e-6, rel=0)
    final = torch.load(Path(cfg.output) / train.CHECKPOINT, weights_only=True)["model"]
    expected = torch.load(Path(ref.output) / train.CHECKPOINT, weights_only=True)["model"]
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)


def test_a_step_is_the_exact_per_token_mean_however_it_is_cut(corpus: Path) -> None:
    """NOTE(token-mean): a step's gradient is that of the mean loss per predicted token of all
    its samples, whether they come as one micro-batch or several."""
    from gpuloader.bytelm import bytelm, next_token_loss
    from gpuloader.objectives import NextTokenObjective

    with gl.DataLoader(gl.open_dataset(corpus), max_tokens=1024, shuffle=False) as loader:
        batch = next(iter(loader))
    tokens, lengths = batch["tokens"], batch["tokens_lengths"]
    lengths[0] = 1  # a sample that predicts nothing
    grads = []
    for cuts in ([0, len(tokens)], [0, 1, 5, len(tokens)]):
        torch.manual_seed(0)
        model = bytelm(d_model=32, layers=1, heads=2)
        objective = NextTokenObjective(model, "tokens")
        count = 0
        for start, stop in zip(cuts, cuts[1:]):
            part = objective.micro({"tokens": tokens[start:stop],
                                    "tokens_lengths": lengths[start:stop]}, None)
            count += part.count
        objective.finish(count)
        assert count == int((lengths - 1).clamp(min=0).sum())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.manual_seed(0)
    model = bytelm(d_model=32, layers=1, heads=2)
    next_token_loss(model(tokens, lengths), tokens, lengths).backward()  # the mean, directly
    for one, several, direct in zip(*grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(one, direct, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(several, direct, rtol=1e-4, atol=1e-7)


TIGHT_LM = textwrap.dedent("""
    import torch
    from gpuloader.bytelm import ByteLM

    class Tight(ByteLM):
        def forward(self, tokens, lengths=None, **kw):
            if self.training and tokens.shape[0] * tokens.shape[1] ** 2 > 8 * 64 ** 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().forward(tokens, lengths, **kw)

    def make(d_model=32, layers=1, heads=2):
        return Tight(d_model=d_model, layers=layers, heads=heads)

    def wrong(**_):
        return torch.nn.Embedding(256, 4)  # (B, L, 4) logits: not a 256-way prediction
""")


@pytest.fixture
def tight_lm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A model of one's own whose step 'runs out of memory' above a B x L^2 limit (attention)."""
    (tmp_path / "tightlm.py").write_text(TIGHT_LM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tightlm:make"


def test_out_of_memory_steps_are_replayed_every_token_once(tmp_path: Path, corpus: Path,
                                                            tight_lm: str) -> None:
    """The guarded run shrinks the plan, replays the step, and trains on every token once; a
    run interrupted after the OOMs and resumed ends with the same loss and weights."""
    ref = _config(tmp_path, corpus, f"model.name={tight_lm}", name="ref")
    reference = train.run(ref)
    ds = gl.open_dataset(corpus)
    for record in reference:
        assert record["tokens"] == int(ds.lengths().sum()) and record["samples"] == len(ds)
        assert record["max_tokens"] < 2048 and np.isfinite(record["loss"])
    assert reference[0]["oom_count"] >= 1
    cfg = _config(tmp_path, corpus, f"model.name={tight_lm}")
    steps = reference[0]["step"]
    train.run(cfg, stop=lambda info: info["step"] >= steps + 2)
    train.run(cfg, resume=True)
    for got, want in zip(_metrics(cfg), reference):
        assert (got["tokens"], got["step"]) == (want["tokens"], want["step"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6, rel=0)


def test_a_model_that_cannot_predict_bytes_is_named(tmp_path: Path, corpus: Path,
                                                    tight_lm: str) -> None:
    cfg = _config(tmp_path, corpus, "model={name: 'tightlm:wrong'}")
    with pytest.raises(ConfigError, match=r"^model.name: tightlm:wrong cannot predict the next "
                                          r"token of data.inputs 'tokens' \(a padded batch of "
                                          r"shape \(2, \d+\)\): "):
        train.run(cfg)


ERRORS = [
    (["loader.batch_size=null"],
     'loader.batch_size: null on ragged data.inputs \'tokens\': expected "auto" '
     "(loader.max_tokens planned from free memory and loader.token_bytes) or a positive integer "
     "(samples per batch; with loader.max_tokens, a cap on them)"),
    (["loader.token_bytes=-1"], "loader.token_bytes: expected an integer >= 0, got -1"),
    (["loader.max_tokens=0"], "loader.max_tokens: expected a positive integer or null, got 0"),
    (["loader.pad_to_multiple_of=0"],
     "loader.pad_to_multiple_of: expected a positive integer, got 0"),
    (["train.global_tokens=0"], "train.global_tokens: expected a positive integer or null, got 0"),
    (["train.global_tokens=null", "train.global_batch_size=64"],
     "train.global_batch_size: 64 counts samples, but ragged data.inputs 'tokens' steps by "
     "tokens; set train.global_tokens instead"),
    (["loader.batch_size=8", "loader.token_bytes=0"],
     "train.global_tokens: 2048 needs a token budget: loader.batch_size: auto or "
     "loader.max_tokens"),
    (["loader.batch_size=8", "loader.max_tokens=512"],
     "loader.token_bytes: 20000 sizes loader.batch_size: auto, but loader.batch_size is 8; set "
     "it to auto or leave token_bytes out"),
    (["model={name: mlp}"],
     "model.name: mlp takes fixed-size rows, but data.inputs 'tokens' is a ragged token field; "
     'use bytelm or "package.module:factory" for a model taking (tokens, lengths)'),
    (["train.loss=mse"],
     "train.loss: mse given, but next-token training on ragged data.inputs 'tokens' uses "
     "cross_entropy per token; leave train.loss out"),
    (["data.targets=tokens"],
     "data.targets: 'tokens' given, but data.inputs 'tokens' is a ragged token field: the model "
     "predicts its next token, which needs no targets; leave data.targets out"),
]


@pytest.mark.parametrize("overrides,line", ERRORS)
def test_each_problem_is_one_line(tmp_path: Path, corpus: Path, overrides: List[str],
                                  line: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, corpus, *overrides)
    assert str(info.value) == line


def test_token_options_on_fixed_size_rows_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "rows"
    folder.mkdir()
    np.save(folder / "x.npy", np.zeros((8, 3), np.float32))
    np.save(folder / "y.npy", np.zeros(8, np.int64))
    raw = {"data": {"path": str(folder)}, "loader": {"max_tokens": 64},
           "model": {"name": "bytelm"}, "output": str(tmp_path / "o")}
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert info.value.problems == [  # type: ignore[attr-defined]
        "loader.max_tokens: 64 applies to a ragged token field, but data.inputs 'x' is "
        "fixed-size; size its batches with loader.batch_size, loader.sample_bytes and "
        "train.global_batch_size",
        "model.name: bytelm predicts the next token of a ragged token field, but data.inputs "
        "'x' is fixed-size; use mlp, cnn or your own"]


def test_bytelm_refuses_token_ids_above_255(tmp_path: Path) -> None:
    values = np.array([1, 2, 300, 4, 5, 6], np.int32)
    gl_ds = {"tokens.values.npy": values, "tokens.offsets.npy": np.array([0, 3, 6], np.int64)}
    folder = tmp_path / "wide"
    folder.mkdir()
    for name, array in gl_ds.items():
        np.save(folder / name, array)
    cfg = from_dict({"data": {"path": str(folder)}, "model": "bytelm",
                     "loader": {"device": "cpu"}, "output": str(tmp_path / "o")})
    with pytest.raises(ConfigError, match=r"^model.name: bytelm embeds bytes 0..255, but "
                                          r"data.inputs 'tokens' holds token ids up to 300"):
        train.run(cfg)


def test_cli_trains_and_reports_one_line_errors(tmp_path: Path, corpus: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    cfg_file = tmp_path / "text.yaml"
    cfg_file.write_text(textwrap.dedent(f"""
        data: {{path: {corpus}}}
        loader: {{device: cpu, token_bytes: 20000, memory_budget: 20000000}}
        model: {{name: bytelm, d_model: 32, layers: 1, heads: 2}}
        train: {{epochs: 1, max_steps: 3, global_tokens: 1024}}
        output: {tmp_path / "cli"}
    """))
    code = main(["train", str(cfg_file), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "(next token of tokens)" in err
    assert "nats/token" in out and "unigram entropy" in out and "tokens/s" in out
    assert re.search(r"max_tokens \d+, 0 OOMs", out), out
    code = main(["train", str(cfg_file), "--overwrite", "--set", "loader.batch_size=null"])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("gpuloader: error: loader.batch_size: null on ragged data.inputs")


@pytest.mark.parametrize("subset", [False, True])
def test_loader_without_batch_size_on_ragged_data_says_what_to_give(corpus: Path,
                                                                    subset: bool) -> None:
    ds: Any = gl.open_dataset(corpus)
    if subset:
        ds = torch.utils.data.Subset(ds, [0, 1, 2])
    for extra in ({}, {"max_tokens": 100}):
        with pytest.raises(ValueError, match=r"^batch_size=None on a dataset with ragged fields "
                                             r"\['tokens'\]: ragged samples are batched by "
                                             r'gpuloader; give batch_size="auto" \(max_tokens '
                                             r"planned from free memory and token_bytes=\)"):
            gl.DataLoader(ds, batch_size=None, **extra)


def test_an_unknown_field_is_the_only_problem_reported(tmp_path: Path, corpus: Path) -> None:
    # The token-step checks assume the fields resolved; they must not add lines of their own.
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, corpus, "data.inputs=nope", "loader.max_tokens=64")
    problems = info.value.problems  # type: ignore[attr-defined]
    assert len(problems) == 1 and problems[0].startswith("data.inputs: unknown field 'nope'")
