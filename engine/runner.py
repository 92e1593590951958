"""Turns scheduled requests into one ForwardBatch and runs the model on it."""
from __future__ import annotations

import torch

from .attention_backend import AttentionBackend
from .forward_batch import ForwardBatch, PerturbationTable, build_forward_batch
from .kv_pool import KVPool
from .model import CausalLM
from .scheduler import ScheduledBatch


class ModelRunner:
    """Owns the model, the KV pool and the attention backend; counts the tokens it computes."""

    def __init__(self, model: CausalLM, pool: KVPool, backend: AttentionBackend, device: torch.device):
        self.model, self.pool, self.backend, self.device = model, pool, backend, device
        self.tokens_computed = 0
        self.forward_passes = 0
        self.perturbation: PerturbationTable | None = None  # the launch's perturbations while MeZO runs

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits of `batch.logits_indices`, in order."""
        self.tokens_computed += batch.num_tokens
        self.forward_passes += 1
        hidden = self.model(batch, self.pool, self.backend)
        return self.model.logits(hidden)

    def run(self, scheduled: ScheduledBatch) -> list[torch.Tensor]:
        """Logits per request: the last position for generation, every scored position for scoring."""
        tokens, prefix_lens, rows = [], [], []
        for req, start in zip(scheduled.requests, scheduled.starts):
            new = req.all_ids[start:]
            tokens.append(new)
            prefix_lens.append(start)
            if req.is_scoring:
                first = max(req.score_from - 1, start)
                end = len(new) if req.keep_logits else len(new) - 1
                rows.append(list(range(first - start, end)))
            else:
                rows.append([len(new) - 1])
        table = self.perturbation
        batch = build_forward_batch(
            scheduled.mode,
            tokens,
            prefix_lens,
            [r.pages for r in scheduled.requests],
            self.pool.page_size,
            rows,
            self.device,
            signs=[r.sign for r in scheduled.requests] if table is not None else None,
            perturbation_ids=[r.perturbation_id for r in scheduled.requests] if table is not None else None,
            table=table,
        )
        logits = self.forward(batch)
        out, offset = [], 0
        for r in rows:
            out.append(logits[offset : offset + len(r)])
            offset += len(r)
        return out
