"""Metadata of one ragged, flattened forward pass (DESIGN §7)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kernels._device import host_to_device


@dataclass(frozen=True)
class PerturbationTable:
    """The perturbations of one launch (issue 14): perturbation p has sample seed ``seeds[p]`` (each
    trainable tensor j perturbs by z = randn(derive_seed(seeds[p], j))) and step size ``eps[p]``.

    One entry is MeZO's two-branch launch; several carry n-SPSA samples or one-sided copies, each
    request naming its own by ``Request.perturbation_id``.
    """

    seeds: tuple[int, ...]
    eps: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.seeds) != len(self.eps) or not self.seeds:
            raise ValueError(f"PerturbationTable needs as many eps as seeds (>= 1), got {len(self.seeds)} seeds "
                             f"and {len(self.eps)} eps")
        for p, seed in enumerate(self.seeds):
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise ValueError(f"perturbation {p}: step_seed={seed!r} (its sample seed) must be an int in [0, 2**63)")
        for p, eps in enumerate(self.eps):
            if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
                raise ValueError(f"perturbation {p}: eps={eps!r} must be a finite number")

    @property
    def size(self) -> int:
        return len(self.seeds)

    @classmethod
    def of(cls, spec: "PerturbationTable | tuple[int, float]") -> "PerturbationTable":
        """A table from itself or from the single-perturbation form (seed, eps)."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            seed, eps = spec
            return cls((seed,), (eps,))
        raise TypeError(f"perturbation must be a PerturbationTable or a (seed, eps) pair, got {spec!r}")


@dataclass
class Perturbation:
    """The MeZO perturbations a forward pass carries: row t runs at θ + σ_t ε_{p_t} z_{p_t}.

    The noise itself is never stored: trainable tensor j regenerates z_p from
    `kernels.derive_seed(sample_seeds[p], j)` inside the matmul. With one perturbation ``token_ids``
    is None (every row is perturbation 0: the two-branch launch the Triton kernel has always run);
    with P > 1 it says which row uses which.
    """

    sample_seeds: tuple[int, ...]  # [P]
    eps: tuple[float, ...]  # [P]
    token_signs: torch.Tensor  # [T] float32, the sign of the sequence each token belongs to
    token_ids: torch.Tensor | None = None  # [T] int32 perturbation id of each token (None: P == 1)
    # host copies (Python lists) of token_signs / token_ids, for `rows_by_id`: None when not built on the host
    host_signs: list[float] | None = field(default=None, repr=False)
    host_ids: list[int] | None = field(default=None, repr=False)
    _seeds: dict = field(default_factory=dict, repr=False)  # tensor index -> its P Philox seeds (per launch)
    _rows: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def rows_by_id(self) -> list[torch.Tensor] | None:
        """P int64 tensors on token_signs' device: the rows with id p and σ != 0 (what the torch
        kernels gather; the Triton kernel reads the ids itself and never asks). Built from the host
        copies on the first call, reused by every later layer of the pass, so no layer reads the ids
        back. None with one perturbation or without host copies (the torch path then derives them)."""
        if self._rows is None and self.token_ids is not None and self.host_signs is not None \
                and self.host_ids is not None:
            buckets: list[list[int]] = [[] for _ in range(self.num_perturbations)]
            for row, (sign, pid) in enumerate(zip(self.host_signs, self.host_ids)):
                if sign != 0:
                    buckets[pid].append(row)
            device = self.token_signs.device
            self._rows = [host_to_device(torch.tensor(rows, dtype=torch.int64), device) for rows in buckets]
        return self._rows

    @property
    def num_perturbations(self) -> int:
        return len(self.sample_seeds)

    @property
    def step_seed(self) -> int:
        """The sample seed of perturbation 0 (the single-perturbation name)."""
        return self.sample_seeds[0]

    def tensor_seeds(self, index: int) -> list[int]:
        """derive_seed(seed_p, index) for every perturbation p, computed once per launch (the
        attention and MLP linears of every layer ask for theirs on every forward)."""
        seeds = self._seeds.get(index)
        if seeds is None:
            from kernels import derive_seed  # deferred: kernels loads triton

            seeds = self._seeds[index] = [derive_seed(s, index) for s in self.sample_seeds]
        return seeds


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
    extend_lens_host: list[int] | None = field(default=None, repr=False)  # new tokens per sequence
    seq_lens_host: list[int] | None = field(default=None, repr=False)  # prefix + new tokens per sequence
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
    perturbation_ids: list[int] | None = None,
    table: PerturbationTable | None = None,
) -> ForwardBatch:
    """Flatten per-sequence new tokens into a ForwardBatch.

    `tokens[b]` are the NEW tokens of sequence b (their positions start at prefix_lens[b]);
    `logits_rows[b]` are indices into tokens[b] whose logits the caller needs.
    With `signs`, the batch carries a perturbation: `table` (or the single (step_seed, eps)) and
    each sequence's id in it (`perturbation_ids`, default all 0). The signs and ids are kept on the
    host too, so the torch path's per-id row lists (`Perturbation.rows_by_id`, built on first use)
    need no read-back. ValueError for an id outside the table.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qo_indptr = [0]
    logits_indices: list[int] = []
    token_signs: list[float] = []
    token_pids: list[int] = []
    ptable = table if table is not None else PerturbationTable((int(step_seed),), (float(eps),))
    pids = perturbation_ids if perturbation_ids is not None else [0] * len(tokens)
    bad = [p for p in pids if not 0 <= p < ptable.size]
    if signs is not None and bad:
        raise ValueError(f"perturbation id {bad[0]} is outside the launch's table of {ptable.size} perturbations")
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
            token_pids.extend([pids[b]] * len(new))
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
        ids = None
        if ptable.size > 1:  # one perturbation keeps the id-less launch (every row is perturbation 0)
            ids = as_tensor(token_pids, torch.int32)
        perturbation = Perturbation(ptable.seeds, ptable.eps, as_tensor(token_signs, torch.float32), ids,
                                    host_signs=token_signs, host_ids=token_pids if ids is not None else None)
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
        extend_lens_host=[len(t) for t in tokens],
        seq_lens_host=seq_lens,
        max_seq_len=max_seq_len,
        perturbation=perturbation,
    )
