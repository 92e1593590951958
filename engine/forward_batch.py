"""Metadata of one ragged, flattened forward pass (DESIGN §7)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch


@dataclass
class Perturbation:
    """A MeZO perturbation carried by a forward pass: every row gets sign σ ∈ {+1, -1, 0}.

    The noise itself is never stored: each trainable tensor regenerates it from
    `kernels.derive_seed(step_seed, tensor_index)` inside the matmul.
    """

    step_seed: int
    eps: float
    token_signs: torch.Tensor  # [T] float32, the sign of the sequence each token belongs to


@dataclass
class ForwardBatch:
    """New tokens of B sequences, flattened to T rows; K/V of earlier tokens are read from pages."""

    mode: Literal["extend", "decode"]
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64 flat slots (page * page_size + offset) for the new K/V
    page_table: torch.Tensor  # [B, max_pages] int32, padded with the null page 0
    prefix_lens: torch.Tensor  # [B] int32, tokens already in the cache before this pass
    seq_lens: torch.Tensor  # [B] int32, prefix + new tokens
    qo_indptr: torch.Tensor  # [B+1] int32, row range of each sequence in the flattened batch
    logits_indices: torch.Tensor  # [L] int64, the only rows whose logits are computed
    # host ints known when the batch is built: they size the attention launches, so no layer reads a
    # device tensor back (a GPU sync) to learn them. None = unknown (the kernels then read them).
    max_extend_len: int | None = None  # most new tokens of one sequence
    max_seq_len: int | None = None  # most prefix + new tokens of one sequence
    perturbation: Perturbation | None = None
    # values derived from this metadata alone that every layer needs (RoPE tables, the torch
    # attention plan): built by the first layer that asks (`memo`), reused by the others
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` on the first call with ``key``, its cached result afterwards (one forward pass)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.prefix_lens.shape[0])


def build_forward_batch(
    mode: Literal["extend", "decode"],
    tokens: list[list[int]],
    prefix_lens: list[int],
    page_tables: list[list[int]],
    page_size: int,
    logits_rows: list[list[int]],
    device: torch.device | str,
    signs: list[float] | None = None,
    step_seed: int = 0,
    eps: float = 0.0,
) -> ForwardBatch:
    """Flatten per-sequence new tokens into a ForwardBatch.

    `tokens[b]` are the NEW tokens of sequence b (their positions start at prefix_lens[b]);
    `logits_rows[b]` are indices into tokens[b] whose logits the caller needs.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qo_indptr = [0]
    logits_indices: list[int] = []
    token_signs: list[float] = []
    for b, new in enumerate(tokens):
        start = prefix_lens[b]
        table = page_tables[b]
        base = qo_indptr[-1]
        for i, tok in enumerate(new):
            pos = start + i
            input_ids.append(tok)
            positions.append(pos)
            slots.append(table[pos // page_size] * page_size + pos % page_size)
        logits_indices.extend(base + r for r in logits_rows[b])
        qo_indptr.append(base + len(new))
        if signs is not None:
            token_signs.extend([signs[b]] * len(new))
    max_pages = max((len(t) for t in page_tables), default=1) or 1
    table_t = torch.zeros((len(tokens), max_pages), dtype=torch.int32)
    for b, table in enumerate(page_tables):
        if table:
            table_t[b, : len(table)] = torch.tensor(table, dtype=torch.int32)
    seq_lens = [p + len(t) for p, t in zip(prefix_lens, tokens)]
    max_extend_len = max((len(t) for t in tokens), default=0)
    max_seq_len = max(seq_lens, default=0)

    def as_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    perturbation = None
    if signs is not None:
        perturbation = Perturbation(step_seed, eps, as_tensor(token_signs, torch.float32))
    return ForwardBatch(
        mode=mode,
        input_ids=as_tensor(input_ids, torch.int64),
        positions=as_tensor(positions, torch.int64),
        out_cache_loc=as_tensor(slots, torch.int64),
        page_table=table_t.to(device, non_blocking=True),  # pageable source: a queued copy, no sync
        prefix_lens=as_tensor(prefix_lens, torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32),
        qo_indptr=as_tensor(qo_indptr, torch.int32),
        logits_indices=as_tensor(logits_indices, torch.int64),
        max_extend_len=max_extend_len,
        max_seq_len=max_seq_len,
        perturbation=perturbation,
    )
