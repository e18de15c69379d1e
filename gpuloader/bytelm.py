"""A small byte-level causal language model (``model.name: bytelm``), its next-byte loss, and
the unigram entropy it is measured against.

Batches come as gpuloader lays out ragged fields (NOTE(ragged-batch) in padding.py): padded
``tokens`` ``(B, L)`` with ``lengths`` ``(B,)``, or packed ``tokens`` ``(T,)`` with ``offsets``
``(B + 1,)`` (cu_seqlens).  Tokens are bytes, 0..255, of any integer dtype.

NOTE(causal-padding): padded batches are padded on the right, so under the causal mask a real
token at position ``t < length`` only ever attends to positions ``<= t``, all real: padding
never reaches a real token, and attention runs with ``is_causal=True`` alone (the fused kernels'
fast path) instead of a per-batch key-padding mask.  Outputs at padding positions are garbage
and the loss leaves them out.  Packed batches need a block-diagonal causal mask (one block per
sample) and positions that restart at each sample; the mask is a dense ``T x T`` boolean (and
keeps SDPA off its fused causal kernels), so packing suits batches of a few thousand tokens --
beyond that, padded batches from length buckets cost less.

Losses are in nats (natural log, what ``torch.nn.functional.cross_entropy`` gives); so is
``unigram_entropy``.  Divide by ``math.log(2)`` for bits.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpuloader.errors import ArgumentError, ArgumentTypeError, describe

__all__ = ["ByteLM", "bytelm", "next_token_loss", "unigram_entropy", "corpus_unigram_entropy",
           "VOCAB"]

#: Bytes: the vocabulary of the model.
VOCAB = 256

_IGNORE = -100  # cross_entropy's ignore_index for positions without a next byte


def _rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``(B, H, L, D)`` at ``positions`` ``(B or 1, L)``:
    relative positions enter attention without a learned table, so any length works."""
    half = x.shape[-1] // 2
    freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32)
                      * (-math.log(10000.0) / half))
    angles = positions.to(torch.float32)[:, None, :, None] * freqs  # (B, 1, L, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class _Block(nn.Module):
    """Pre-norm Transformer layer: causal self-attention, then a GELU feed-forward."""

    def __init__(self, d_model: int, heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_mult * d_model), nn.GELU(),
                                nn.Linear(ff_mult * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (self.qkv(self.norm1(x))
                   .view(batch, length, 3, self.heads, width // self.heads)
                   .permute(2, 0, 3, 1, 4))  # 3 x (B, H, L, D)
        q, k = _rotate(q, positions), _rotate(k, positions)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.ff(self.norm2(x))


class ByteLM(nn.Module):
    """Byte-level causal Transformer: embedding of the 256 bytes, ``layers`` pre-norm layers
    with rotary positions and ``torch.nn.functional.scaled_dot_product_attention``, a final
    norm and an output layer tied to the embedding.  ``forward`` gives next-byte logits."""

    def __init__(self, *, d_model: int = 128, layers: int = 2, heads: int = 4,
                 ff_mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("layers", layers), ("heads", heads),
                            ("ff_mult", ff_mult)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"bytelm {name} must be a positive int, got "
                                    f"{describe(value)}")
        if d_model % heads or (d_model // heads) % 2:
            raise ArgumentError(f"bytelm d_model must be a multiple of 2 * heads (an even "
                                f"width per head), got d_model={d_model}, heads={heads}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
                not 0.0 <= dropout < 1.0:
            raise ArgumentError(f"bytelm dropout must be a number in [0, 1), got "
                                f"{describe(dropout)}")
        self.embed = nn.Embedding(VOCAB, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads, ff_mult, float(dropout))
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None, *,
                offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(B, L, 256)`` for padded ``tokens`` ``(B, L)`` (``lengths`` is accepted for
        symmetry and not needed: NOTE(causal-padding)), or ``(T, 256)`` for packed ``tokens``
        ``(T,)`` with ``offsets`` ``(B + 1,)``.  The logits at ``t`` predict byte ``t + 1``."""
        if offsets is not None:
            documents, positions = _packed_layout(tokens, offsets)
            same = documents[:, None] == documents[None, :]
            mask = torch.tril(same)[None, None]  # (1, 1, T, T): causal within a sample
            return self._run(tokens[None], positions[None], mask)[0]
        if tokens.dim() != 2:
            raise ArgumentError(f"tokens must be a padded (B, L) batch or packed (T,) with "
                                f"offsets=, got shape {tuple(tokens.shape)}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return self._run(tokens, positions, None)

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor,
             mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.embed(tokens.long())
        for block in self.blocks:
            x = block(x, positions, mask)
        return self.head(self.norm(x))


def bytelm(*, d_model: int = 128, layers: int = 2, heads: int = 4, ff_mult: int = 4,
           dropout: float = 0.0) -> ByteLM:
    """The built-in ``bytelm`` factory (NOTE(model-factory) in models.py): a ``ByteLM``."""
    return ByteLM(d_model=d_model, layers=layers, heads=heads, ff_mult=ff_mult,
                  dropout=dropout)


def _packed_layout(tokens: torch.Tensor,
                   offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(document, position)`` of every packed token: its sample index and place in it."""
    if tokens.dim() != 1:
        raise ArgumentError(f"packed tokens must be 1-D (T,), got shape {tuple(tokens.shape)}")
    offsets = offsets.to(device=tokens.device, dtype=torch.int64)
    if offsets.dim() != 1 or len(offsets) < 1 or int(offsets[0]) != 0 or \
            int(offsets[-1]) != len(tokens) or bool((offsets[1:] < offsets[:-1]).any()):
        raise ArgumentError(f"offsets must be non-decreasing cu_seqlens from 0 to "
                            f"len(tokens)={len(tokens)}, got {describe(offsets.tolist())}")
    counts = offsets[1:] - offsets[:-1]
    documents = torch.repeat_interleave(torch.arange(len(counts), device=tokens.device), counts)
    positions = torch.arange(len(tokens), device=tokens.device) - offsets[documents]
    return documents, positions


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor,
                    lengths: Optional[torch.Tensor] = None, *,
                    offsets: Optional[torch.Tensor] = None,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats) of predicting each byte from the bytes before it in its sample.

    Padded: ``logits`` ``(B, L, V)``, ``tokens`` ``(B, L)``, ``lengths`` ``(B,)`` (None: every
    row is full); a sample of length ``n`` contributes its ``n - 1`` predictions, padding none.
    Packed: ``logits`` ``(T, V)``, ``tokens`` ``(T,)`` and ``offsets``.  ``reduction``: "mean"
    (per predicted byte), "sum", or "none" (per position, 0 where nothing is predicted).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ArgumentError(f"reduction must be 'mean', 'sum' or 'none', got "
                            f"{describe(reduction)}")
    targets = tokens.long().roll(-1, dims=-1)
    if offsets is not None:
        documents, _ = _packed_layout(tokens, offsets)
        valid = torch.zeros_like(documents, dtype=torch.bool)
        valid[:-1] = documents[1:] == documents[:-1]
    else:
        if tokens.dim() != 2:
            raise ArgumentError(f"tokens must be a padded (B, L) batch or packed (T,) with "
                                f"offsets=, got shape {tuple(tokens.shape)}")
        full = torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
        limit = (full if lengths is None else lengths.to(tokens.device)) - 1
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None] < limit[:, None]
    targets = torch.where(valid, targets, torch.full_like(targets, _IGNORE))
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=_IGNORE, reduction="none").view(targets.shape)
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


BytesLike = Union[bytes, bytearray, memoryview, np.ndarray, torch.Tensor]


def unigram_entropy(data: Union[BytesLike, Iterable[BytesLike]]) -> float:
    """Entropy in nats of the byte distribution of ``data``: the loss per byte of the best
    model that ignores context, so a per-byte ``next_token_loss`` below it has learned from
    context.  ``data``: bytes-like, an integer array or tensor of values 0..255, or an
    iterable of those (chunks of one corpus, counted together).  Divide by ``math.log(2)`` for
    bits."""
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview, np.ndarray,
                                         torch.Tensor)) else data
    counts = np.zeros(VOCAB, dtype=np.int64)
    for chunk in chunks:
        counts += np.bincount(_as_bytes(chunk), minlength=VOCAB)
    if int(counts.sum()) == 0:
        raise ArgumentError("unigram_entropy needs at least one byte, got empty data")
    return _entropy(counts)


def _entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the distribution ``counts`` (non-negative, not all zero) says."""
    p = counts[counts > 0] / int(counts.sum())
    return float(-(p * np.log(p)).sum())


#: Token ids ``corpus_unigram_entropy`` counts at most (larger vocabularies are not counted).
_MAX_VOCAB = 1 << 24


def corpus_unigram_entropy(ds: object, field: str, *,
                           limit: int = 1 << 28) -> Tuple[Optional[float], int, int]:
    """``(entropy in nats, tokens counted, largest token id)`` of ragged ``field`` of dataset
    ``ds``, read in storage order through a packed DataLoader (bounded memory).  Counts the
    first ``limit`` tokens at most (the third value says how many); the entropy is None for an
    empty field or token ids outside ``0 .. 2**24 - 1``."""
    from gpuloader.loader import DataLoader

    counts = np.zeros(VOCAB, dtype=np.int64)
    seen, largest = 0, -1
    with DataLoader(ds, max_tokens=1 << 22, packed=True, shuffle=False) as loader:
        for batch in loader:
            values = batch[field].numpy()  # type: ignore[index]
            if not values.size:
                continue
            low, high = int(values.min()), int(values.max())
            largest = max(largest, high)
            if low < 0 or high >= _MAX_VOCAB:
                return None, seen, largest
            if high >= len(counts):
                counts = np.concatenate([counts, np.zeros(high + 1 - len(counts), np.int64)])
            counts += np.bincount(values, minlength=len(counts))
            seen += int(values.size)
            if seen >= limit:
                break
    return (_entropy(counts) if seen else None), seen, largest


def _as_bytes(chunk: object) -> np.ndarray:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return np.frombuffer(chunk, dtype=np.uint8)
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().cpu().numpy()
    if not isinstance(chunk, np.ndarray) or chunk.dtype.kind not in "ui":
        raise ArgumentTypeError(f"unigram_entropy data must be bytes or integer arrays of byte "
                                f"values 0..255, got {type(chunk).__name__} {describe(chunk)}")
    values = chunk.reshape(-1)
    if values.size and (int(values.min()) < 0 or int(values.max()) >= VOCAB):
        raise ArgumentError(f"unigram_entropy data must hold byte values 0..255, got values "
                            f"from {int(values.min())} to {int(values.max())}")
    return values.astype(np.int64, copy=False)
