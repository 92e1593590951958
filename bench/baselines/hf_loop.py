"""The competent baseline: the MeZO step a careful transformers user would write.

Beside `reference_mezo.py` (a faithful re-implementation of princeton-nlp/MeZO's step: full
[rows, width, vocab] logits, one row per candidate), this is the loop one writes knowing how
transformers spends its time:
- one right-padded forward per branch through the decoder body with SDPA attention;
- the LM head and log-softmax only at the positions that are scored (never [rows, width, vocab]);
- an example whose candidates are all single tokens is ONE row (its prompt): every candidate is
  read off the logits of the prompt's last position;
- in-place perturbation (+eps, -2eps, +eps) and update, z regenerated from a private
  torch.Generator seeded per step (no global RNG, no copy of the weights).
Same objective as the engine and the reference: classification = cross-entropy over each candidate's
mean token log-prob; LM = mean token cross-entropy over the batch's targets.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from bench.baselines.reference_mezo import Encode, pad_rows, tokenize
from mezo.data import ClassificationExample, LMExample


@dataclass
class ScoredBatch:
    """Right-padded rows and the positions to score.

    input_ids / attention_mask: [rows, width] int64. Score s reads the logits at (row[s], col[s])
    and the log-prob of token target[s]; it belongs to sequence seq[s] (a candidate, or an LM example).
    labels [examples] / num_options (per example) for classification, None for LM.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    target: torch.Tensor
    seq: torch.Tensor
    num_seqs: int
    labels: torch.Tensor | None
    num_options: list[int] | None

    def to(self, device: torch.device | str) -> "ScoredBatch":
        return replace(self, **{k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)})


def build_scored_batch(examples: Sequence[ClassificationExample | LMExample], encode: Encode,
                       encode_continuation: Encode, pad_id: int = 0) -> ScoredBatch:
    """Tokenize as the engine does (`reference_mezo.tokenize`: prompt with BOS, continuation without)."""
    rows: list[list[int]] = []
    row, col, target, seq = [], [], [], []
    per_example = tokenize(examples, encode, encode_continuation)
    n_seq = 0
    for ex_rows, label in per_example:
        # every candidate single-token: all read off the prompt's last position, one row
        one_row = label is not None and all(k == 1 for _, k in ex_rows)
        if one_row:
            rows.append(ex_rows[0][0][:-1])
        for ids, k in ex_rows:
            if not one_row:
                rows.append(ids)
            for j in range(len(ids) - k, len(ids)):
                row.append(len(rows) - 1), col.append(j - 1), target.append(ids[j]), seq.append(n_seq)
            n_seq += 1
    ids, mask = pad_rows(rows, pad_id)
    cls = per_example[0][1] is not None
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return ScoredBatch(ids, mask, as_long(row), as_long(col), as_long(target), as_long(seq), n_seq,
                       as_long([lab for _, lab in per_example]) if cls else None,
                       [len(r) for r, _ in per_example] if cls else None)


def scored_loss(model: torch.nn.Module, batch: ScoredBatch) -> torch.Tensor:
    """The batch's loss (fp32 scalar) from one forward; logits only at the scored positions."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # also under a PEFT wrapper
    body, head = lm.get_decoder(), lm.get_output_embeddings()
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    logits = head(hidden[batch.row, batch.col]).float()                 # [scores, vocab]
    picked = logits.log_softmax(-1).gather(-1, batch.target[:, None])[:, 0]
    if batch.num_options is None:
        return -picked.mean()
    total = torch.zeros(batch.num_seqs, device=picked.device).index_add_(0, batch.seq, picked)
    count = torch.zeros(batch.num_seqs, device=picked.device).index_add_(0, batch.seq, torch.ones_like(picked))
    scores = total / count                                             # mean token log-prob per candidate
    if len(set(batch.num_options)) == 1:
        return F.cross_entropy(scores.view(len(batch.num_options), -1), batch.labels)
    per_example = torch.split(scores, batch.num_options)
    return torch.stack([F.cross_entropy(s[None], batch.labels[e:e + 1]) for e, s in enumerate(per_example)]).mean()


class HFLoopMeZO:
    """MeZO-SGD (n = 1) on the parameters of `model` that require grad, with `scored_loss`."""

    def __init__(self, model: torch.nn.Module, lr: float, eps: float, weight_decay: float = 0.0) -> None:
        self.model, self.lr, self.eps, self.weight_decay = model.eval(), lr, eps, weight_decay
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad)")
        self.decay = [not any(s in n for s in ("bias", "norm")) for n, _ in self.params]

    def _walk(self, seed: int):
        g = torch.Generator(device=self.params[0][1].device).manual_seed(seed)
        for (_, p), decay in zip(self.params, self.decay):
            yield p, torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype), decay

    @torch.no_grad()
    def _perturb(self, seed: int, scale: float) -> None:
        for p, z, _ in self._walk(seed):
            p.add_(z, alpha=scale * self.eps)

    @torch.inference_mode()
    def _loss(self, batch: ScoredBatch) -> torch.Tensor:
        return scored_loss(self.model, batch)

    def step(self, batch: ScoredBatch, seed: int) -> float:
        """One step; returns the mean of the two branch losses (one host sync, for g)."""
        self._perturb(seed, 1.0)
        loss_plus = self._loss(batch)
        self._perturb(seed, -2.0)
        loss_minus = self._loss(batch)
        self._perturb(seed, 1.0)
        g = float((loss_plus - loss_minus) / (2 * self.eps))
        with torch.no_grad():
            for p, z, decay in self._walk(seed):
                p.add_(z * g + (self.weight_decay * p if decay else 0.0), alpha=-self.lr)
        return float((loss_plus + loss_minus) / 2)
