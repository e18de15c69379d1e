"""Config-driven training: ``gpuloader train config.yaml`` and ``gpuloader.train.run(config)``.

One run owns one output folder::

    <output>/config.yaml      the resolved config (absolute paths, inferred fields and outputs)
    <output>/metrics.jsonl    one JSON line per finished epoch (appended)
    <output>/checkpoint.pt    model, optimizer, loader state, progress (atomically replaced)

NOTE(train-resume): a checkpoint is written only between optimizer steps — at every epoch end,
every ``train.checkpoint_every`` steps, and when a run stops early (``train.max_steps`` or the
``stop`` hook).  It holds the loader's ``state_dict`` (which counts exactly the samples that
were trained on), the epoch's running sums, and every epoch record written so far.  ``resume``
restores all of it, so the interrupted epoch continues with the samples not yet trained on —
none twice, none skipped — and its record covers the whole epoch.  The checkpoint is written
before the metrics line; on resume, records the checkpoint has but metrics.jsonl lacks are
appended, so the file ends with exactly one line per finished epoch.

NOTE(partial-record): a run that ends at ``train.max_steps`` in the middle of an epoch (how
sequence models usually train: by steps, not epochs) also appends a record of that epoch so far,
marked ``"partial": true`` (validation included) and not kept in the checkpoint; if a resumed
run finishes the epoch, its full record follows.  Interruptions (signals, the ``stop`` hook)
write none: they are continued.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from gpuloader import fit
from gpuloader.config import Config, ConfigError, dump, load
from gpuloader.errors import GpuLoaderError
from gpuloader.interrupts import Signals, TrainingInterrupted, deferred_signals
from gpuloader.objectives import (NextTokenObjective, RowObjective, class_labels, infer_outputs,
                                  make_loss, make_optimizer, prepare_inputs, prepare_targets,
                                  record_fields)
from gpuloader.runsums import EpochSums, Recent, Stretch
from gpuloader.runfiles import append_metrics, atomic_save, read_metrics, recorded_split
from gpuloader.stats import rates

__all__ = ["run", "make_optimizer", "make_loss", "prepare_targets", "CHECKPOINT", "METRICS"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESOLVED_CONFIG = "config.yaml"
_FORMAT = 1

StopHook = Callable[[Dict[str, Any]], bool]


# --------------------------------------------------------------------------------------------
# pieces


def _open(cfg: Config, fields: List[str]) -> Any:
    from gpuloader.dataset import open_dataset

    kwargs: Dict[str, Any] = {}
    if cfg.data.dtype is not None:
        kwargs["dtype"] = cfg.data.dtype
    if cfg.data.shape is not None:
        kwargs["shape"] = cfg.data.shape
    return open_dataset(cfg.data.path, fields=fields, **kwargs)


# --------------------------------------------------------------------------------------------
# the run


class _Run:
    """Everything one training run holds; built by ``run``.  A ragged ``data.inputs`` field
    (``data.targets`` None) trains by next-token prediction, fixed-size rows against targets:
    one loop, two objectives (objectives.py)."""

    def __init__(self, cfg: Config, *, progress: bool, stop: Optional[StopHook],
                 split: Optional[Dict[str, int]] = None, signals: Optional[Signals] = None
                 ) -> None:
        from gpuloader.devices import resolve_device

        self.cfg = cfg
        self.progress = progress
        self.stop_hook = stop
        self.signals = signals
        self.out = Path(cfg.output)
        data = cfg.data
        self.sequence = data.targets is None  # config.py leaves it None for ragged inputs only
        fields = [data.inputs] if self.sequence else [data.inputs, data.targets]
        self.ds = _open(cfg, fields)
        self.loaders: List[Any] = []
        self.baseline: Dict[str, Any] = {}
        try:
            self.split = self._rows_split(split)
            self.n_train = len(self.split.train)
            self.device = resolve_device(cfg.loader.device) or torch.device("cpu")
            self.outputs: Optional[int] = None
            self.labels = False  # class-index targets (set for row training below)
            if self.sequence:
                self.baseline = _unigram_baseline(self.cfg, self.ds)
            else:
                self._resolve_outputs()
            self._build_model()
            self._build_loaders()
        except BaseException:
            self.close()
            raise
        self.sample_nbytes = sum(self.ds.fields[f].sample_nbytes for f in fields)
        self.epochs_done = 0
        self.step = 0
        self.sums = EpochSums()
        self.recent = Recent(self.device)
        self.records: List[Dict[str, Any]] = []

    def _resolve_outputs(self) -> None:
        """Fixed-size rows: check the fields and labels, infer ``model.outputs``."""
        from gpuloader.models import factory_options, resolve_factory

        cfg, data = self.cfg, self.cfg.data
        fit.check_fields(cfg, self.ds.fields)
        self.labels = class_labels(cfg.train.loss, self.ds.fields[data.targets])
        label_range = self._label_range() if self.labels else None
        outputs = cfg.model.kwargs.get("outputs")
        if outputs is None:
            outputs = infer_outputs(cfg, self.ds.fields[data.targets], label_range)
            accepted = factory_options(resolve_factory(cfg.model.name))
            if accepted is None or "outputs" in accepted:  # record it in config.yaml
                self.cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                    cfg.model, options=tuple(sorted(
                        dict(cfg.model.options, outputs=outputs).items()))))
        self.outputs = int(outputs)
        if label_range is not None:
            fit.check_labels(cfg, self.outputs, *label_range)

    def _label_range(self) -> Tuple[int, int]:
        ds = _open(self.cfg, [self.cfg.data.targets])  # the labels alone
        try:
            return fit.label_range(ds, self.cfg.data.targets)
        finally:
            ds.close()

    def _rows_split(self, recorded: Optional[Dict[str, int]]) -> fit.Split:
        """NOTE(train-split): the config's split, or the one a checkpoint recorded."""
        n = len(self.ds)
        if recorded is None:
            return fit.split_rows(n, self.cfg.train.val_fraction, self.cfg.train.seed)
        if int(recorded["rows"]) != n:
            raise ConfigError(f"--resume: the checkpoint's train/validation split covers "
                              f"{recorded['rows']} rows, but {self.cfg.data.path} has {n}")
        return fit.Split(n, int(recorded["val_rows"]), int(recorded["seed"]))

    def _build_model(self) -> None:
        from gpuloader.models import build_model

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model.name, cfg.model.kwargs,
                            input_shape=tuple(self.ds.fields[cfg.data.inputs].shape),
                            outputs=self.outputs)
        self.model = model.to(self.device)
        self.objective: Union[RowObjective, NextTokenObjective]
        if self.sequence:
            self.objective = NextTokenObjective(self.model, cfg.data.inputs)
            self.objective.dry_run(self.ds, self.device, cfg.model.name)
        else:
            self.objective = RowObjective(self.model, cfg.train.loss, cfg.data.inputs,
                                          cfg.data.targets, labels=self.labels)
            fit.dry_run(cfg, self.ds, self.model, make_loss(cfg.train.loss), self.device,
                        prepare_inputs=prepare_inputs, prepare_targets=prepare_targets,
                        outputs=self.outputs if self.labels else None)
        self.optimizer = make_optimizer(cfg.train.optimizer, self.model.parameters(),
                                        cfg.train.lr, cfg.train.weight_decay)

    def _build_loaders(self) -> None:
        from gpuloader.loader import DataLoader

        cfg, lc = self.cfg, self.cfg.loader
        common = dict(device=self.device, num_workers=lc.num_workers,
                      memory_fraction=lc.memory_fraction, memory_budget=lc.memory_budget,
                      sample_bytes=lc.sample_bytes, min_batch_size=lc.min_batch_size,
                      max_batch_size=lc.max_batch_size, prefetch_depth=lc.prefetch_depth)
        if self.sequence:
            common.update(_token_options(cfg))
        split = self.split
        train_ds = self.ds if split.val_rows == 0 else torch.utils.data.Subset(
            self.ds, split.train.tolist())
        with warnings.catch_warnings():
            if cfg.train.global_batch_size is not None:  # accumulated: micro-batch sizes only
                warnings.filterwarnings("ignore", message='batch_size="auto" chose')
            self.loader = DataLoader(train_ds, batch_size=lc.batch_size, shuffle=lc.shuffle,
                                     order=lc.order, drop_last=lc.drop_last,
                                     seed=cfg.train.seed, **common)
        self.loaders.append(self.loader)
        self.val_loader = None
        if split.val_rows:
            val_ds = torch.utils.data.Subset(self.ds, split.val.tolist())
            with warnings.catch_warnings():  # validation batches do not change the model
                warnings.filterwarnings("ignore", message='batch_size="auto" chose')
                self.val_loader = DataLoader(val_ds, batch_size=lc.batch_size, shuffle=False,
                                             seed=cfg.train.seed, **common)
            self.loaders.append(self.val_loader)

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()
        close = getattr(self.ds, "close", None)
        if close is not None:
            close()

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self) -> None:
        state = {
            "format": _FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "epoch": self.epochs_done,        # epochs finished (the next one to run, 0-based)
            "epochs_done": self.epochs_done,
            "step": self.step,
            "epoch_sums": self.sums.state(),
            "recent": self.recent.state(),
            "records": self.records,
            "rng": torch.get_rng_state(),
            "config": self.cfg.to_dict(),
            "split": self.split.state(),
        }
        atomic_save(state, self.out / CHECKPOINT)

    def restore(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt or foreign file
            raise GpuLoaderError(f"--resume: cannot read checkpoint {path}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise GpuLoaderError(f"--resume: {path} is not a gpuloader training checkpoint")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.loader.load_state_dict(state["loader"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(f"--resume: checkpoint {path} does not fit this config "
                              f"(model, optimizer or data changed?): "
                              f"{str(exc).strip().splitlines()[0]}") from None
        self.epochs_done = int(state["epochs_done"])
        self.step = int(state["step"])
        self.sums = EpochSums(**state["epoch_sums"])
        if "recent" in state:
            self.recent.load(state["recent"])
        self.records = list(state["records"])
        torch.set_rng_state(state["rng"])
        metrics = self.out / METRICS
        written = {r.get("epoch") for r in read_metrics(metrics) if not r.get("partial")}
        append_metrics(metrics, [r for r in self.records if r.get("epoch") not in written])

    # -- the loop ------------------------------------------------------------------------------
    def _batches(self) -> Iterator[Tuple[List[Tuple[Any, float]], bool]]:
        """Per optimizer step: an iterable of ``(batch, weight)`` micro-batches."""
        train = self.cfg.train
        if train.global_tokens is not None:
            steps: Any = self.loader.accumulate(global_tokens=train.global_tokens)
        elif train.global_batch_size is not None:
            steps = self.loader.accumulate(train.global_batch_size)
        else:
            for batch in self.loader:
                yield [(batch, 1.0)], False
            return
        for step in steps:
            yield step, True

    def train_epoch(self, epoch: int) -> bool:
        """Train (the rest of) ``epoch``; False when the run stopped early."""
        self.model.train()
        self.loader.set_epoch(epoch)
        self.loader.stats_reset()
        started = time.perf_counter()
        run = Stretch(self.device)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.n_train, initial=self.sums.samples, unit="sample",
                       unit_scale=True, dynamic_ncols=True, leave=True,
                       desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}")
        stopped = False
        try:
            for micro_batches, accumulating in self._batches():
                step = Stretch(self.device)
                failed = False
                for batch, weight in micro_batches:
                    guard = self.loader.oom_guard(self.optimizer)
                    with guard:  # the activations live in micro()'s frame: the guard frees them
                        part = self.objective.micro(batch, weight if accumulating else None)
                    if guard.failed:
                        # NOTE(exactly-once) in adaptive.py: with an optimizer the guard rewinds
                        # to the start of the step and zeroes the gradients, so the step's
                        # micro-batches come again; forget what they added.
                        failed = True
                        step = Stretch(self.device)
                        continue
                    step.add(part)
                if failed and not accumulating:
                    continue  # rolled back: the same samples come again, smaller
                if step.samples == 0:
                    continue
                self.objective.finish(step.count)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                run.add(step)
                self.recent.add(step.loss_sum, step.count)
                size = self.loader.batch_size
                if size is not None and size not in self.sums.batch_sizes:
                    self.sums.batch_sizes.append(int(size))
                if bar is not None:
                    bar.update(step.samples)
                    st = self.loader.stats()
                    live = (f"max_tokens={st['max_tokens']}" if st["max_tokens"] is not None
                            else f"bs={self.loader.batch_size}")
                    bar.set_postfix_str(f"{live}, stall={100 * st['stall_fraction']:.0f}%",
                                        refresh=False)
                if self._should_stop():
                    stopped = True
                    break
                every = self.cfg.train.checkpoint_every
                if every and self.step % every == 0:
                    self._fold(run, started)
                    run, started = Stretch(self.device), time.perf_counter()
                    self.loader.stats_reset()
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()
        self._fold(run, started)
        if stopped:
            self.checkpoint()
        return not stopped

    def _fold(self, run: Stretch, started: float) -> None:
        """Add this stretch's sums (since ``started``) to the epoch's."""
        st = self.loader.stats()
        s = self.sums
        s.loss_sum += float(run.loss_sum.item())
        s.samples += run.samples
        s.count += run.count
        s.tokens += run.tokens
        s.steps = self.step
        s.bytes += (run.tokens if self.sequence else run.samples) * self.sample_nbytes
        s.wait_s += float(st["wait_s"])
        s.oom_count += int(st["oom_count"])  # the loader counts rollbacks: one counter
        s.elapsed_s += time.perf_counter() - started

    def _should_stop(self) -> bool:
        limit = self.cfg.train.max_steps
        stop = limit is not None and self.step >= limit
        if not stop and self.stop_hook is not None:
            stop = bool(self.stop_hook({"epoch": self.epochs_done + 1, "step": self.step,
                                        "samples": self.sums.samples}))
        return stop or (self.signals is not None and self.signals.signum is not None)

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        loader = self.val_loader
        if loader is None:
            return {}
        self.model.eval()
        loader.set_epoch(0)
        total = Stretch(self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for batch in loader:
            part, right = self.objective.evaluate(batch)
            total.add(part)
            if right is not None:
                correct += right
        result = {"val_loss": float(total.loss_sum.item()) / max(1, total.count)}
        if self.labels:
            result["val_accuracy"] = float(correct.item()) / max(1, total.count)
        return result

    def epoch_record(self, epoch: int) -> Dict[str, Any]:
        s = self.sums
        rate = rates(s.samples, s.bytes, s.elapsed_s, s.wait_s)
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": s.loss_sum / max(1, s.count if self.sequence else s.samples),
            "loss_per": self.objective.unit,
            **self.recent.fields(),
            "samples": s.samples,
            "step": s.steps,
            "samples_per_s": rate.samples_per_s,
            "gb_per_s": rate.gb_per_s,
            "batch_size": self.loader.batch_size,
            "path": self.loader.path,
            "batch_sizes": list(s.batch_sizes),
            "stall_fraction": rate.stall_fraction,
            "oom_count": s.oom_count,
            "elapsed_s": s.elapsed_s,
            "device": str(self.device),
            "resumed": s.resumed,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        record.update(record_fields(self.objective.unit, s, dict(
            max_tokens=self.loader.max_tokens, **self.baseline)))
        record.update(self.validate())
        return record


def _token_options(cfg: Config) -> Dict[str, Any]:
    """DataLoader options of next-token training: the token budget and padding.  Under auto the
    planned ``max_tokens`` is at most ``loader.max_tokens`` and ``train.global_tokens``: a
    larger micro-batch could only make a larger step (NOTE(config-global-batch))."""
    lc = cfg.loader
    caps = [v for v in (lc.max_tokens, cfg.train.global_tokens if lc.batch_size == "auto"
                        else None) if v is not None]
    options: Dict[str, Any] = {"pad_to_multiple_of": lc.pad_to_multiple_of,
                               "max_tokens": min(caps) if caps else None}
    if lc.batch_size == "auto":
        options["token_bytes"] = lc.token_bytes
    return options


def _unigram_baseline(cfg: Config, ds: Any) -> Dict[str, Any]:
    """The entropy per token of the corpus' token frequencies (the loss of the best model that
    ignores context), recorded beside the loss; ConfigError for bytelm on tokens >= 256."""
    from gpuloader.bytelm import VOCAB, corpus_unigram_entropy

    entropy, counted, largest = corpus_unigram_entropy(ds, cfg.data.inputs)
    if cfg.model.name == "bytelm" and largest >= VOCAB:
        raise ConfigError(f"model.name: bytelm embeds bytes 0..{VOCAB - 1}, but data.inputs "
                          f"{cfg.data.inputs!r} holds token ids up to {largest}; use a model "
                          'of your own ("package.module:factory") for larger vocabularies')
    if entropy is None:
        return {}
    return {"unigram_entropy": entropy, "unigram_tokens": counted}


def run(config: Union[Config, str, "os.PathLike[str]"], resume: bool = False, *,
        overwrite: bool = False, progress: bool = False, stop: Optional[StopHook] = None,
        log: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Train as ``config`` says (a Config, or a path for ``gpuloader.config.load``).

    Returns the epoch records written by this call (see metrics.jsonl).  ``resume=True``
    continues from ``<output>/checkpoint.pt`` (NOTE(train-resume)); without it an output folder
    that already holds a checkpoint is refused unless ``overwrite=True``, which starts over.
    ``progress``: a tqdm bar per epoch.  ``stop(info) -> bool`` is called after every optimizer
    step with ``{"epoch", "step", "samples"}``; True checkpoints and returns.  ``log``
    receives one-line messages (e.g. ``print``).
    """
    cfg = config if isinstance(config, Config) else load(config)
    say = log or (lambda _msg: None)
    out = Path(cfg.output)
    ckpt = out / CHECKPOINT
    if resume and not ckpt.exists():
        raise ConfigError(f"--resume: no checkpoint to resume in {out} ({CHECKPOINT} is "
                          "missing); run without --resume to start")
    if not resume and ckpt.exists():
        if not overwrite:
            raise ConfigError(f"output: {out} already holds a run ({CHECKPOINT}); use --resume "
                              "to continue it, --overwrite to start over, or another output "
                              "(--set output=...)")
        for name in (CHECKPOINT, METRICS):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    with deferred_signals() as signals:
        split = recorded_split(ckpt) if resume else None
        r = _Run(cfg, progress=progress, stop=stop, split=split, signals=signals)
        try:
            return _train_epochs(r, cfg, resume=resume, say=say)
        finally:
            r.close()


def _train_epochs(r: _Run, cfg: Config, *, resume: bool,
                  say: Callable[[str], None]) -> List[Dict[str, Any]]:
    out = Path(cfg.output)
    ckpt = out / CHECKPOINT
    new_records: List[Dict[str, Any]] = []
    dump(r.cfg, out / RESOLVED_CONFIG)
    if resume:
        r.restore(ckpt)
        r.sums.resumed = r.sums.samples > 0
        say(f"resuming {out}: {r.epochs_done} of {cfg.train.epochs} epochs done, "
            f"{r.sums.samples} samples into the next")
    limit = cfg.train.max_steps
    for epoch in range(r.epochs_done, cfg.train.epochs):
        if limit is not None and r.step >= limit:
            say(f"train.max_steps={limit} already reached (step {r.step}); nothing to do")
            break
        if r.signals is not None and r.signals.signum is not None:
            break  # arrived after the last checkpoint of the previous epoch
        if not r.train_epoch(epoch):
            if limit is not None and r.step >= limit:  # NOTE(partial-record)
                record = dict(r.epoch_record(epoch), partial=True)
                append_metrics(out / METRICS, [record])
                new_records.append(record)
                say(_format_record(record))
            if r.signals is None or r.signals.signum is None:
                say(f"stopped after step {r.step}; checkpoint in {ckpt} (resume with --resume)")
            break
        record = r.epoch_record(epoch)
        r.records.append(record)
        r.epochs_done = epoch + 1
        r.sums = EpochSums()
        r.checkpoint()
        append_metrics(out / METRICS, [record])
        new_records.append(record)
        say(_format_record(record))
    if r.signals is not None and r.signals.signum is not None:
        if not ckpt.exists():  # the signal came before the first step
            r.checkpoint()
        raise TrainingInterrupted(r.signals.signum, (
            f"{r.signals.name} received: stopped after step {r.step} with the checkpoint "
            f"saved in {ckpt}; continue with --resume"))
    return new_records


def _format_record(record: Dict[str, Any]) -> str:
    if record.get("loss_per") == "token":
        text = f"epoch {record['epoch']}: loss {record['loss']:.4f} nats/token"
        if record.get("recent_loss") is not None:
            text += f" (last {record['recent_steps']} steps {record['recent_loss']:.4f})"
        if "unigram_entropy" in record:
            text += f", unigram entropy {record['unigram_entropy']:.4f}"
        text += (f", {record['tokens_per_s']:,.0f} tokens/s, max_tokens {record['max_tokens']}, "
                 f"{record['oom_count']} OOMs, stall {100 * record['stall_fraction']:.1f}%")
    else:
        text = (f"epoch {record['epoch']}: loss {record['loss']:.4f}, "
                f"{record['samples_per_s']:,.0f} samples/s, batch {record['batch_size']}, "
                f"{record.get('path', '?')} path, "
                f"stall {100 * record['stall_fraction']:.1f}%")
    if "val_loss" in record:
        text += f", val_loss {record['val_loss']:.4f}"
    if "val_accuracy" in record:
        text += f", val_accuracy {record['val_accuracy']:.3f}"
    return text
