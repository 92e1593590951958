"""A request's life: tokens, owned pages, cache lock and finish state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from .sampling_params import SamplingParams


@dataclass
class Request:
    """One sequence in the scheduler.

    `pages` are page ids this request holds one reference to; `num_computed` tokens of
    `all_ids` have their K/V in those pages. A scoring request (`score_from` set) generates
    nothing: it needs the log-probs of its tokens from `score_from` on.
    """

    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    namespace: Hashable = None
    score_from: int | None = None
    sign: float = 0.0  # MeZO branch of this sequence: +1, -1, or 0 (unperturbed)
    perturbation_id: int = 0  # which perturbation of the launch's table (engine.forward_batch.PerturbationTable)
    keep_logits: bool = False  # scoring only: also keep the fp32 logits rows (tests, debugging)
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    cached_tokens: int = 0
    admitted_once: bool = False
    lock_node: Any = None
    generator: torch.Generator | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" (its call raised before it finished)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's field)
    stop_rules: Any = None  # engine.stops.StopRules, built on the first decoded token
    token_logprobs: torch.Tensor | None = None  # scoring: log-prob of each token from score_from on
    logits: torch.Tensor | None = None
    text: str = ""

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_scoring(self) -> bool:
        return self.score_from is not None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def max_total_tokens(self) -> int:
        """Upper bound of tokens whose K/V this request may ever need at once."""
        if self.is_scoring:
            return len(self.prompt_ids)
        return len(self.prompt_ids) + self.params.max_tokens - 1
