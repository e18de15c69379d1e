"""Config checks that depend on whether ``data.inputs`` is a ragged token field (next-token
training, seqtrain.py) or fixed-size rows, and the optimizer-step size each kind defaults to.

Every problem is one ``<key>: <what is wrong>`` line added to the collecting checker
(NOTE(config-errors) in config.py): the key, the value received, what would be accepted.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

__all__ = ["DEFAULT_GLOBAL_BATCH", "DEFAULT_GLOBAL_TOKENS", "check_sequence", "resolve_steps"]

#: Samples per optimizer step when ``loader.batch_size`` is auto (NOTE(config-global-batch)).
DEFAULT_GLOBAL_BATCH = 256
#: Real tokens per optimizer step on ragged inputs when ``loader.batch_size`` is auto.
DEFAULT_GLOBAL_TOKENS = 16384

#: Built-in models of fixed-size rows (they cannot take token sequences).
_ROW_MODELS = ("mlp", "cnn")


def check_sequence(c: Any, cfg: Any, inputs: str, spec: Any) -> None:
    """A ragged ``data.inputs`` field is trained on by next-token prediction: it must hold
    integer token ids, the model must take ``(tokens, lengths)``, the loss is cross-entropy."""
    dtype = np.dtype(spec.dtype)
    if not np.issubdtype(dtype, np.integer):
        c.add("data.inputs", f"ragged field {inputs!r} holds {dtype} values, not token ids; "
                             "next-token training needs an integer token field (e.g. one made "
                             "by gpuloader convert from text)")
    if cfg.model.name in _ROW_MODELS:
        c.add("model.name", f"{cfg.model.name} takes fixed-size rows, but data.inputs "
                            f"{inputs!r} is a ragged token field; use bytelm or "
                            '"package.module:factory" for a model taking (tokens, lengths)')
    if cfg.train.loss != "cross_entropy":
        c.add("train.loss", f"{cfg.train.loss} given, but next-token training on ragged "
                            f"data.inputs {inputs!r} uses cross_entropy per token; leave "
                            "train.loss out")


def resolve_steps(c: Any, cfg: Any, ragged: Optional[str], *, known: bool) -> Any:
    """Check the batching keys against the kind of inputs and fill in the optimizer-step size
    (NOTE(config-global-batch) in config.py).  ``ragged``: the ragged ``data.inputs`` field,
    or None; ``known``: whether the data was opened (else only the fixed-size defaults apply)."""
    lc, train = cfg.loader, cfg.train
    if ragged is not None:
        return _ragged_steps(c, cfg, ragged)
    if lc.batch_size is None:
        c.add("loader.batch_size", 'expected a positive integer or "auto", got null')
    if known:
        field = repr(cfg.data.inputs)
        for key, value, default in (("loader.token_bytes", lc.token_bytes, 0),
                                    ("loader.max_tokens", lc.max_tokens, None),
                                    ("loader.pad_to_multiple_of", lc.pad_to_multiple_of, 1),
                                    ("train.global_tokens", train.global_tokens, None)):
            if value != default:
                c.add(key, f"{value} applies to a ragged token field, but data.inputs {field} "
                           "is fixed-size; size its batches with loader.batch_size, "
                           "loader.sample_bytes and train.global_batch_size")
        if cfg.model.name == "bytelm":
            c.add("model.name", f"bytelm predicts the next token of a ragged token field, but "
                                f"data.inputs {field} is fixed-size; use mlp, cnn or your own")
    if lc.batch_size == "auto" and train.global_batch_size is None:
        train = dataclasses.replace(train, global_batch_size=DEFAULT_GLOBAL_BATCH)
    return dataclasses.replace(cfg, train=train)


def _ragged_steps(c: Any, cfg: Any, field: str) -> Any:
    lc, train = cfg.loader, cfg.train
    if lc.batch_size is None:
        c.add("loader.batch_size", f'null on ragged data.inputs {field!r}: expected "auto" '
                                   "(loader.max_tokens planned from free memory and "
                                   "loader.token_bytes) or a positive integer (samples per "
                                   "batch; with loader.max_tokens, a cap on them)")
        return cfg
    if train.global_batch_size is not None:
        c.add("train.global_batch_size", f"{train.global_batch_size} counts samples, but ragged "
                                         f"data.inputs {field!r} steps by tokens; set "
                                         "train.global_tokens instead")
    budget = lc.batch_size == "auto" or lc.max_tokens is not None
    if train.global_tokens is not None and not budget:
        c.add("train.global_tokens", f"{train.global_tokens} needs a token budget: "
                                     "loader.batch_size: auto or loader.max_tokens")
    if lc.token_bytes and lc.batch_size != "auto":
        c.add("loader.token_bytes", f"{lc.token_bytes} sizes loader.batch_size: auto, but "
                                    f"loader.batch_size is {lc.batch_size}; set it to auto or "
                                    "leave token_bytes out")
    if lc.batch_size == "auto" and train.global_tokens is None:
        train = dataclasses.replace(train, global_tokens=DEFAULT_GLOBAL_TOKENS)
    return dataclasses.replace(cfg, train=train)
