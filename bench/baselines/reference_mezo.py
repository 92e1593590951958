"""The reference MeZO step, re-implemented on any transformers (+PEFT) causal LM.

Follows princeton-nlp/MeZO ``large_models/trainer.py`` (``zo_perturb_parameters``, ``zo_forward``,
``zo_step``, ``zo_update``) and ``utils.forward_wrap_with_option_len``: in-place perturbation
+eps, -2eps, +eps with z regenerated from ``torch.manual_seed(seed)`` before each of the four passes
(global RNG, ``torch.normal``), full [N, L, vocab] logits over one right-padded batch. It is the
baseline the engine is timed and checked against, so it stays deliberately naive; only n-SPSA
with n = 1 (the paper's choice) is provided.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from mezo.data import ClassificationExample, LMExample

Encode = Callable[[str], list[int]]


@dataclass
class RefBatch:
    """Right-padded token rows. Each row scores its last ``target_lens[i]`` real tokens.

    Classification: one row per (example, candidate), ``num_options[e]`` rows per example and
    ``labels[e]`` the gold candidate. LM: one row per example, labels/num_options None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]
    target_lens: list[int]
    labels: torch.Tensor | None = None
    num_options: list[int] | None = None


def tokenize(examples: Sequence[ClassificationExample | LMExample], encode: Encode,
             encode_continuation: Encode | None = None) -> list[tuple[list[tuple[list[int], int]], int | None]]:
    """Per example: (its rows, label or None for LM); a row, one per candidate or the LM target, is
    (token ids, k continuation tokens at the end). Prompt and continuation are tokenized separately
    with ``encode_continuation`` (no BOS), as an engine that caches prompt KV must; without it as MeZO's
    ``encode_prompt``: the whole text, k the length difference. ValueError: mixed kinds, k outside [1, length)."""
    if len({type(ex) for ex in examples}) != 1:
        raise ValueError(f"a batch must hold one kind of example, got {sorted({type(ex).__name__ for ex in examples})}")
    out, i = [], 0
    for ex in examples:
        cls, rows = isinstance(ex, ClassificationExample), []
        for cont in ex.candidates if cls else [ex.target]:
            tail = encode_continuation(cont) if encode_continuation is not None else None
            ids = encode(ex.prompt) + tail if tail is not None else encode(ex.prompt + cont)
            k = len(tail) if tail is not None else len(ids) - len(encode(ex.prompt))
            if k < 1 or k >= len(ids):
                raise ValueError(f"row {i}: continuation is {k} tokens of {len(ids)}; need 1 <= k < length")
            rows.append((ids, k))
            i += 1
        out.append((rows, ex.label if cls else None))
    return out


def pad_rows(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [rows, width] int64 token ids and the 0/1 attention mask."""
    ids = pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True, padding_value=pad_id)
    return ids, pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)


def build_batch(examples: Sequence[ClassificationExample | LMExample], encode: Encode, pad_id: int = 0,
                encode_continuation: Encode | None = None) -> RefBatch:
    """Tokenize examples (``tokenize``) into a ``RefBatch``: one row per candidate. ``encode`` maps text
    to ids (e.g. an HF tokenizer's ``encode``, BOS included)."""
    per_example = tokenize(examples, encode, encode_continuation)
    rows = [row for ex_rows, _ in per_example for row in ex_rows]
    input_ids, mask = pad_rows([ids for ids, _ in rows], pad_id)
    cls = per_example[0][1] is not None
    return RefBatch(input_ids, mask, [len(ids) for ids, _ in rows], [k for _, k in rows],
                    torch.tensor([lab for _, lab in per_example]) if cls else None,
                    [len(r) for r, _ in per_example] if cls else None)


def _target_logprobs(model: torch.nn.Module, batch: RefBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each row's target tokens, [N, L-1], and the 0/1 mask selecting them."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    if logits.dtype in (torch.float16, torch.bfloat16):  # losses accumulate in at least fp32
        logits = logits.float()
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    targets = batch.input_ids[:, 1:]
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    dev = picked.device  # the reference builds these on the CPU; on the logits' device it also runs on a GPU
    pos = torch.arange(targets.shape[1], device=dev).unsqueeze(0)
    n = torch.tensor(batch.lengths, device=dev).unsqueeze(1)
    k = torch.tensor(batch.target_lens, device=dev).unsqueeze(1)
    sel = ((pos >= n - 1 - k) & (pos < n - 1)).to(picked.dtype)  # targets n-k..n-1, shifted by one
    return picked * sel, sel


def batch_loss(model: torch.nn.Module, batch: RefBatch) -> torch.Tensor:
    """MeZO's loss. Classification (``train_as_classification``): each candidate's mean token
    log-prob, cross-entropy over an example's candidates, mean over examples. LM: teacher-forced
    cross-entropy averaged over all target tokens of the batch (``CrossEntropyLoss`` mean)."""
    picked, sel = _target_logprobs(model, batch)
    if batch.num_options is None:
        return -picked.sum() / sel.sum()
    scores = picked.sum(-1) / sel.sum(-1)
    labels = batch.labels.to(scores.device)
    losses, start = [], 0
    for e, n_opt in enumerate(batch.num_options):
        losses.append(F.cross_entropy(scores[start : start + n_opt].unsqueeze(0), labels[e : e + 1]))
        start += n_opt
    return torch.stack(losses).mean()


def decays(name: str) -> bool:
    """The reference's weight-decay test, extended to LLaMA's ``*norm`` names (DESIGN §10: never
    decay biases and norms); OPT names are caught by the reference's own substrings."""
    return not any(s in name for s in ("bias", "layer_norm", "layernorm", "norm."))


class ReferenceMeZO:
    """MeZO-SGD on the parameters of ``model`` that require grad (LoRA A/B under PEFT)."""

    def __init__(self, model: torch.nn.Module, lr: float, eps: float, weight_decay: float = 0.0,
                 loss_fn: Callable[[torch.nn.Module, RefBatch], torch.Tensor] = batch_loss) -> None:
        self.model, self.lr, self.eps, self.weight_decay, self.loss_fn = model, lr, eps, weight_decay, loss_fn
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad)")
        self.last_projected_grad: float | None = None

    def _z(self, p: torch.Tensor) -> torch.Tensor:
        return torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)

    def perturb(self, seed: int, scaling_factor: float) -> None:
        """theta <- theta + scaling_factor * z * eps, z regenerated from ``seed``."""
        torch.manual_seed(seed)
        for _, p in self.params:
            p.data = p.data + scaling_factor * self._z(p) * self.eps

    def forward(self, batch: RefBatch) -> torch.Tensor:
        """Loss without gradients and without dropout (``zo_forward``)."""
        self.model.eval()
        with torch.inference_mode():
            return self.loss_fn(self.model, batch).detach()

    def projected_grad(self, batch: RefBatch, seed: int) -> float:
        """(L(theta+eps z) - L(theta-eps z)) / (2 eps); parameters are restored (up to fp rounding:
        +eps, -2eps, +eps is not bit-exact in floating point, exactly as in the reference)."""
        self.perturb(seed, 1)
        loss1 = self.forward(batch)
        self.perturb(seed, -2)
        loss2 = self.forward(batch)
        g = ((loss1 - loss2) / (2 * self.eps)).item()
        self.perturb(seed, 1)
        self.last_projected_grad, self.last_loss = g, loss1.item()
        return g

    def update(self, seed: int, projected_grad: float, lr: float | None = None) -> None:
        """theta <- theta - lr (g z + wd theta), z regenerated from ``seed`` (``zo_update``)."""
        lr = self.lr if lr is None else lr
        torch.manual_seed(seed)
        for name, p in self.params:
            z = self._z(p)
            if decays(name):
                p.data = p.data - lr * (projected_grad * z + self.weight_decay * p.data)
            else:
                p.data = p.data - lr * (projected_grad * z)

    def step(self, batch: RefBatch, seed: int, lr: float | None = None) -> float:
        """One MeZO step; returns L(theta+eps z) as the reference's ``zo_step`` does. The projected
        gradient is kept in ``last_projected_grad``."""
        g = self.projected_grad(batch, seed)
        self.update(seed, g, lr)
        return self.last_loss
