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
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from gpuloader import fit
from gpuloader.config import Config, ConfigError, dump, load
from gpuloader.errors import GpuLoaderError
from gpuloader.interrupts import Signals, TrainingInterrupted, deferred_signals
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


def make_optimizer(name: str, params: Any, lr: float,
                   weight_decay: Optional[float] = None) -> torch.optim.Optimizer:
    """``adamw``, ``adam`` or ``sgd`` (momentum 0.9) over ``params``."""
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **extra)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **extra)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, **extra)
    raise ConfigError(f"train.optimizer: unknown optimizer {name!r}; valid optimizers: "
                      "adamw, adam, sgd")


def make_loss(name: str) -> nn.Module:
    """``cross_entropy``, ``mse`` or ``bce_with_logits`` (mean over the batch)."""
    losses = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss,
              "bce_with_logits": nn.BCEWithLogitsLoss}
    if name not in losses:
        raise ConfigError(f"train.loss: unknown loss {name!r}; valid losses: "
                          f"{', '.join(losses)}")
    return losses[name]()


def class_labels(loss: str, spec: Any) -> bool:
    """True when ``cross_entropy`` targets of this FieldSpec are class indices (integers, or
    floats holding integers, one per sample) rather than per-class probabilities."""
    return loss == "cross_entropy" and (len(spec.shape) == 0 or tuple(spec.shape) == (1,))


def prepare_targets(loss: str, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Targets in the dtype and shape ``loss`` needs for outputs ``out``: int64 class indices
    of shape ``(B,)`` for cross_entropy labels; float32 shaped like ``out`` otherwise."""
    if loss == "cross_entropy" and (y.dim() == 1 or (y.dim() == 2 and y.shape[1] == 1)):
        return y.reshape(-1).long()
    y = y.float()
    if y.shape != out.shape and y.numel() == out.numel():
        y = y.reshape(out.shape)
    return y


def prepare_inputs(x: torch.Tensor) -> torch.Tensor:
    """Inputs as float32 (the built-in models' parameter dtype)."""
    return x if x.dtype == torch.float32 else x.float()


def _open(cfg: Config, fields: List[str]) -> Any:
    from gpuloader.dataset import open_dataset

    kwargs: Dict[str, Any] = {}
    if cfg.data.dtype is not None:
        kwargs["dtype"] = cfg.data.dtype
    if cfg.data.shape is not None:
        kwargs["shape"] = cfg.data.shape
    return open_dataset(cfg.data.path, fields=fields, **kwargs)


def _infer_outputs(cfg: Config, spec: Any, labels: Optional[Tuple[int, int]]) -> int:
    """``model.outputs`` when the config leaves it out: classes (largest label + 1) for
    cross_entropy labels, else the number of target values per sample."""
    if labels is None:
        return int(math.prod(spec.shape)) if spec.shape else 1
    if labels[1] < 0:
        raise ConfigError(f"model.outputs: cannot infer the number of classes: field "
                          f"{cfg.data.targets!r} holds no non-negative labels; set model.outputs")
    return labels[1] + 1


@dataclasses.dataclass
class _EpochSums:
    """Running sums of one epoch (kept in checkpoints, NOTE(train-resume))."""

    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0
    bytes: int = 0
    wait_s: float = 0.0
    elapsed_s: float = 0.0
    oom_count: int = 0
    batch_sizes: List[int] = dataclasses.field(default_factory=list)
    resumed: bool = False

    def state(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# the run


class _Run:
    """Everything one training run holds; built by ``run``."""

    def __init__(self, cfg: Config, *, progress: bool, stop: Optional[StopHook],
                 split: Optional[Dict[str, int]] = None, signals: Optional[Signals] = None
                 ) -> None:
        from gpuloader.devices import resolve_device
        from gpuloader.models import factory_options, resolve_factory

        self.cfg = cfg
        self.progress = progress
        self.stop_hook = stop
        self.signals = signals
        self.out = Path(cfg.output)
        data = cfg.data
        fields = [data.inputs, data.targets]
        self.ds = _open(cfg, fields)
        self.loaders: List[Any] = []
        try:
            self.split = self._rows_split(split)
            self.n_train = len(self.split.train)
            fit.check_fields(cfg, self.ds.fields)
            self.device = resolve_device(cfg.loader.device) or torch.device("cpu")
            self.labels = class_labels(cfg.train.loss, self.ds.fields[data.targets])
            label_range = self._label_range() if self.labels else None
            outputs = cfg.model.kwargs.get("outputs")
            if outputs is None:
                outputs = _infer_outputs(cfg, self.ds.fields[data.targets], label_range)
                accepted = factory_options(resolve_factory(cfg.model.name))
                if accepted is None or "outputs" in accepted:  # record it in config.yaml
                    self.cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                        cfg.model, options=tuple(sorted(
                            dict(cfg.model.options, outputs=outputs).items()))))
            self.outputs = int(outputs)
            if label_range is not None:
                fit.check_labels(cfg, self.outputs, *label_range)
            self._build_model()
            self._build_loaders()
        except BaseException:
            self.close()
            raise
        self.sample_nbytes = sum(self.ds.fields[f].sample_nbytes for f in fields)
        self.epochs_done = 0
        self.step = 0
        self.sums = _EpochSums()
        self.records: List[Dict[str, Any]] = []

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
        self.loss_fn = make_loss(cfg.train.loss)
        fit.dry_run(cfg, self.ds, self.model, self.loss_fn, self.device,
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
        self.sums = _EpochSums(**state["epoch_sums"])
        self.records = list(state["records"])
        torch.set_rng_state(state["rng"])
        metrics = self.out / METRICS
        written = {r.get("epoch") for r in read_metrics(metrics)}
        append_metrics(metrics, [r for r in self.records if r.get("epoch") not in written])

    # -- the loop ------------------------------------------------------------------------------
    def _batches(self) -> Iterator[Tuple[List[Tuple[Any, float]], bool]]:
        """Per optimizer step: an iterable of ``(batch, weight)`` micro-batches."""
        gbs = self.cfg.train.global_batch_size
        if gbs is None:
            for batch in self.loader:
                yield [(batch, 1.0)], False
        else:
            for step in self.loader.accumulate(gbs):
                yield step, True  # type: ignore[misc]

    def _split(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        return (prepare_inputs(batch[self.cfg.data.inputs]), batch[self.cfg.data.targets])

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor,
                          weight: Optional[float]) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the loss, detached.

        A method of its own so that the activations (``out``, the graph behind ``loss``) are
        locals of a frame that ends when an out-of-memory error leaves it: ``oom_guard`` can
        then free them before it re-plans.  Bound in the loop body, they would live on through
        the guard's ``gc`` and ``empty_cache``, and the retry would run next to them.
        """
        out = self.model(x)
        loss = self.loss_fn(out, prepare_targets(self.cfg.train.loss, y, out))
        (loss * weight if weight is not None else loss).backward()
        return loss.detach()

    def train_epoch(self, epoch: int) -> bool:
        """Train (the rest of) ``epoch``; False when the run stopped early."""
        self.model.train()
        self.loader.set_epoch(epoch)
        self.loader.stats_reset()
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        samples_here = 0
        base_samples = self.sums.samples
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.n_train, initial=base_samples, unit="sample",
                       unit_scale=True, dynamic_ncols=True, leave=True,
                       desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}")
        stopped = False
        try:
            for micro_batches, accumulating in self._batches():
                step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
                step_samples = 0
                failed = False
                for batch, weight in micro_batches:
                    x, y = self._split(batch)
                    guard = self.loader.oom_guard(self.optimizer)
                    with guard:
                        loss = self._forward_backward(x, y, weight if accumulating else None)
                    if guard.failed:
                        # NOTE(exactly-once) in adaptive.py: with an optimizer the guard rewinds
                        # to the start of the step and zeroes the gradients, so the step's
                        # micro-batches come again; forget what they added.
                        failed = True
                        step_loss.zero_()
                        step_samples = 0
                        continue
                    b = int(x.shape[0])
                    step_loss += loss.double() * b
                    step_samples += b
                if failed and not accumulating:
                    continue  # rolled back: the same samples come again, smaller
                if step_samples == 0:
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                loss_sum += step_loss
                samples_here += step_samples
                size = self.loader.batch_size
                if size is not None and size not in self.sums.batch_sizes:
                    self.sums.batch_sizes.append(int(size))
                if bar is not None:
                    bar.update(step_samples)
                    st = self.loader.stats()
                    bar.set_postfix(bs=self.loader.batch_size,
                                    stall=f"{100 * st['stall_fraction']:.0f}%", refresh=False)
                if self._should_stop():
                    stopped = True
                    break
                every = self.cfg.train.checkpoint_every
                if every and self.step % every == 0:
                    self._fold(loss_sum, samples_here, started)
                    loss_sum.zero_()
                    samples_here, started = 0, time.perf_counter()
                    self.loader.stats_reset()
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()
        self._fold(loss_sum, samples_here, started)
        if stopped:
            self.checkpoint()
        return not stopped

    def _fold(self, loss_sum: torch.Tensor, samples: int, started: float) -> None:
        """Add this stretch's sums (since ``started``) to the epoch's."""
        st = self.loader.stats()
        s = self.sums
        s.loss_sum += float(loss_sum.item())
        s.samples += samples
        s.steps = self.step
        s.bytes += samples * self.sample_nbytes
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
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        count = 0
        for batch in loader:
            x, y = self._split(batch)
            out = self.model(x)
            target = prepare_targets(self.cfg.train.loss, y, out)
            b = int(x.shape[0])
            total += self.loss_fn(out, target).double() * b
            if self.labels:
                correct += (out.argmax(dim=1) == target).sum()
            count += b
        result = {"val_loss": float(total.item()) / max(1, count)}
        if self.labels:
            result["val_accuracy"] = float(correct.item()) / max(1, count)
        return result

    def epoch_record(self, epoch: int) -> Dict[str, Any]:
        s = self.sums
        rate = rates(s.samples, s.bytes, s.elapsed_s, s.wait_s)
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": s.loss_sum / max(1, s.samples),
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
        record.update(self.validate())
        return record


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
            if r.signals is None or r.signals.signum is None:
                say(f"stopped after step {r.step}; checkpoint in {ckpt} (resume with --resume)")
            break
        record = r.epoch_record(epoch)
        r.records.append(record)
        r.epochs_done = epoch + 1
        r.sums = _EpochSums()
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
    text = (f"epoch {record['epoch']}: loss {record['loss']:.4f}, "
            f"{record['samples_per_s']:,.0f} samples/s, batch {record['batch_size']}, "
            f"{record.get('path', '?')} path, "
            f"stall {100 * record['stall_fraction']:.1f}%")
    if "val_loss" in record:
        text += f", val_loss {record['val_loss']:.4f}"
    if "val_accuracy" in record:
        text += f", val_accuracy {record['val_accuracy']:.3f}"
    return text
