"""Scoring candidate continuations of one prompt with the prompt's KV computed once.

The prompt runs as one request that keeps its last logits row: that row gives every candidate's
first token. Each candidate of two or more tokens then runs as a request scored from its second
token on, so the scheduler can let it wait for the prompt and reuse all of the prompt's KV (its
partly filled last page included) and compute only the candidate's own tokens.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .request import Request


class RequestFactory(Protocol):
    def __call__(self, ids: list[int], *, score_from: int, keep_logits: bool = False) -> Request: ...


def candidate_requests(prompt: list[int], candidates: list[list[int]], make: RequestFactory) -> list[Request]:
    """[the prompt's request] + one request per candidate longer than one token, in order."""
    if not prompt:
        raise ValueError("candidate scoring needs a non-empty prompt")
    if not candidates or any(not c for c in candidates):
        raise ValueError("every candidate needs at least one token")
    reqs = [make(list(prompt), score_from=len(prompt), keep_logits=True)]
    reqs += [make(list(prompt) + list(c), score_from=len(prompt) + 1) for c in candidates if len(c) > 1]
    return reqs


def candidate_token_logprobs(candidates: list[list[int]], reqs: list[Request]) -> list[torch.Tensor]:
    """Log-prob of each token of each candidate ([len(c)] fp32 tensors on the model's device)."""
    if len(reqs) != 1 + sum(len(c) > 1 for c in candidates):
        raise ValueError(f"{len(reqs)} requests do not belong to these {len(candidates)} candidates "
                         "(expected those of candidate_requests)")
    first = torch.log_softmax(reqs[0].logits[-1].float(), dim=-1)
    heads = first[torch.tensor([c[0] for c in candidates]).to(first.device, non_blocking=True)]
    tails = iter(reqs[1:])
    out = []
    for j, cand in enumerate(candidates):
        lp = heads[j:j + 1]
        if len(cand) > 1:
            lp = torch.cat([lp, next(tails).token_logprobs])
        out.append(lp)
    return out
