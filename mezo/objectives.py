"""Turn examples into engine requests, and the requests' logits into per-example losses/metrics."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Hashable

import torch

from engine import Engine, SamplingParams
from engine.candidates import candidate_requests, candidate_token_logprobs
from engine.request import Request

from .data import ClassificationExample, LMExample


@dataclass
class EncodedExample:
    """Token ids of one example: prompt, candidates (classification) or target (LM / generation)."""

    prompt: list[int]
    candidates: list[list[int]] | None = None
    label: int = -1
    target: list[int] | None = None
    target_text: str = ""

    @property
    def single_token(self) -> bool:
        return self.candidates is not None and all(len(c) == 1 for c in self.candidates)


def encode(engine: Engine, ex: ClassificationExample | LMExample) -> EncodedExample:
    """Candidates/targets are tokenized on their own and appended to the prompt ids (as in `Engine.score`)."""
    prompt = engine.encode(ex.prompt)
    tok = engine.tokenizer
    if isinstance(ex, ClassificationExample):
        cands = [list(tok.encode(c, add_special_tokens=False)) for c in ex.candidates]
        for c, text in zip(cands, ex.candidates):
            if not c:
                raise ValueError(f"candidate {text!r} encodes to no tokens")
        return EncodedExample(prompt, candidates=cands, label=ex.label)
    target = list(tok.encode(ex.target, add_special_tokens=False))
    return EncodedExample(prompt, target=target, target_text=ex.target)


def scoring_requests(engine: Engine, ex: EncodedExample, sign: float, namespace: Hashable) -> list[Request]:
    """Requests whose logits give the example's loss. Classification: the prompt once, plus one request
    per multi-token candidate that reuses all of the prompt's KV (engine/candidates.py)."""
    def make(ids: list[int], *, score_from: int, keep_logits: bool = False) -> Request:
        return engine.new_request(ids, score_from=score_from, keep_logits=keep_logits, sign=sign,
                                  namespace=namespace)

    if ex.candidates is None:
        return [make(ex.prompt + ex.target, score_from=len(ex.prompt))]
    return candidate_requests(ex.prompt, ex.candidates, make)


def candidate_scores(ex: EncodedExample, reqs: list[Request]) -> torch.Tensor:
    """Mean token log-prob of each candidate (MeZO's train_as_classification), fp32 [num_candidates]."""
    return torch.stack([lp.mean() for lp in candidate_token_logprobs(ex.candidates, reqs)])


def example_loss(ex: EncodedExample, reqs: list[Request]) -> torch.Tensor:
    """Classification: cross-entropy over candidate scores. LM: mean CE of the target tokens."""
    if ex.candidates is not None:
        scores = candidate_scores(ex, reqs)
        return -torch.log_softmax(scores, dim=-1)[ex.label]
    return -reqs[0].token_logprobs.mean()


def generation_request(engine: Engine, ex: EncodedExample, sign: float, namespace: Hashable,
                       max_new_tokens: int) -> Request:
    """Greedy generation up to the first newline. Score its `text`: what `Engine.generate` returns
    (stop string cut off, special tokens skipped), not the raw decoded ids, which run past the stop."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    return engine.new_request(ex.prompt, params, sign=sign, namespace=namespace)


def _normalize(text: str) -> list[str]:
    text = re.sub(r"[^a-z0-9 ]", " ", text.lower())
    return [w for w in text.split() if w not in {"a", "an", "the"}]


def generation_metric(objective: str, prediction: str, target: str) -> float:
    """Exact match ("accuracy") or SQuAD-style token F1 ("f1") of a greedy generation."""
    pred, gold = _normalize(prediction), _normalize(target)
    if objective == "accuracy":
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def summarize(objective: str, examples: list[EncodedExample], reqs: list[list[Request]],
              engine: Engine) -> dict[str, Any]:
    """Metrics of an unperturbed evaluation pass."""
    if objective in ("accuracy", "f1"):
        scores = [generation_metric(objective, r[0].text, ex.target_text) for ex, r in zip(examples, reqs)]
        return {objective: sum(scores) / len(scores), "n": len(scores)}
    losses = torch.stack([example_loss(ex, r) for ex, r in zip(examples, reqs)])
    out: dict[str, Any] = {"loss": float(losses.mean()), "n": len(examples)}
    if objective == "classification":
        correct = [int(candidate_scores(ex, r).argmax()) == ex.label for ex, r in zip(examples, reqs)]
        out["accuracy"] = sum(correct) / len(correct)
    return out
