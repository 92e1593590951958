"""The user-facing Engine: load a model, generate with continuous batching, score continuations."""
from __future__ import annotations

import itertools
import math
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .adapter_api import AdapterMixin
from .attention_backend import AttentionBackend
from .candidates import candidate_requests, candidate_token_logprobs
from .kernel_choice import resolve_kernels
from .forward_batch import PerturbationTable
from .kv_pool import KVPool
from .loader import load_config, load_state_dict, load_tokenizer, resolve_model
from .model import CausalLM
from .model_config import ModelSpec
from .radix_cache import RadixCache
from .request import Request
from .runner import ModelRunner
from .sampler import sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .stops import special_tokens, update_text
from .validation import attach_completions, validate_prompt

DEFAULT_CPU_CACHE_TOKENS = 32768
DEFAULT_GPU_CACHE_FRACTION = 0.5


@dataclass
class Completion:
    """One finished request (vLLM's RequestOutput, flattened)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    finish_reason: str | None  # "stop" | "length" | "error"
    error: str | None = None
    stop_reason: str | int | None = None  # the stop string / stop token id that ended it, as in vLLM


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is not one of 'auto', {', '.join(map(repr, table))}")
    return table[dtype]


def cache_pages(spec: ModelSpec, device: torch.device, dtype: torch.dtype, page_size: int,
                max_cache_tokens: int | None) -> int:
    """Pages of the KV pool, the reserved null page included.

    max_cache_tokens=None: on CUDA, half of the memory free now (`torch.cuda.mem_get_info`, read
    after the weights are loaded); elsewhere DEFAULT_CPU_CACHE_TOKENS. Raises ValueError for a bad
    `max_cache_tokens`, or when free GPU memory holds no page at all.
    """
    if max_cache_tokens is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            usable = KVPool.pages_for_budget(int(free * DEFAULT_GPU_CACHE_FRACTION), spec.num_layers, page_size,
                                             spec.num_kv_heads, spec.head_dim, dtype)
            if usable < 1:
                raise ValueError(f"only {free} bytes of GPU memory are free: not one KV page of {page_size} tokens "
                                 "fits in half of it; pass max_cache_tokens")
            return 1 + usable  # +1: the reserved null page
        max_cache_tokens = DEFAULT_CPU_CACHE_TOKENS
    if isinstance(max_cache_tokens, bool) or not isinstance(max_cache_tokens, int) or max_cache_tokens < page_size:
        raise ValueError(f"max_cache_tokens must be an int >= page_size ({page_size}), got {max_cache_tokens!r}")
    return 1 + math.ceil(max_cache_tokens / page_size)  # +1: the reserved null page


class Engine(AdapterMixin):
    """A paged-KV LLaMA engine. `model` is a built-in name, an HF directory or a .gguf path.

    kernels: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton" — one switch for
    attention, the noisy LoRA linear and the MeZO update (engine/kernel_choice.py). "triton" on CPU
    runs the Triton interpreter and needs TRITON_INTERPRET=1 set before triton is imported
    (ValueError otherwise). attention_backend="auto" follows `kernels` (see AttentionBackend);
    an explicit attention_backend overrides it for attention only.

    `max_model_len` (vLLM's name) caps prompt + generated tokens below the model's
    max_position_embeddings; a sliding-window model (Mistral, Qwen2 with use_sliding_window) runs
    only when the window covers that whole context (ValueError naming `sliding_window` otherwise).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        page_size: int = 16,
        max_cache_tokens: int | None = None,
        attention_backend: str = "auto",
        enable_prefix_cache: bool = True,
        max_prefill_tokens: int = 8192,
        max_running: int = 256,
        kernels: str = "auto",
        max_model_len: int | None = None,
        *,
        _hf_model: Any = None,
        _tokenizer: Any = None,
    ):
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self.kernels = resolve_kernels(kernels, self.device)
        self.backend = AttentionBackend.select(attention_backend, self.device, page_size, kernels)
        if _hf_model is not None:
            hf_config, self.tokenizer = _hf_model.config, _tokenizer
            state = {k: v.detach().to(self.dtype) for k, v in _hf_model.state_dict().items()}
            self.model_name = getattr(hf_config, "_name_or_path", "") or "in-memory"
        else:
            source = resolve_model(model)
            hf_config = load_config(source)
            self.tokenizer = load_tokenizer(source)
            state = load_state_dict(source, self.dtype)
            self.model_name = source.name
        self.hf_config = hf_config
        self.spec = ModelSpec.from_hf(hf_config, max_model_len)
        self.model = CausalLM(self.spec, hf_config, self.dtype, self.device)
        self._load_weights(state)
        for linear in self.model.linears().values():
            linear.kernels = self.kernels
        self.page_size = page_size
        num_pages = self._num_pages(max_cache_tokens)
        self.pool = KVPool(self.spec.num_layers, num_pages, page_size, self.spec.num_kv_heads,
                           self.spec.head_dim, self.dtype, self.device)
        self.cache = RadixCache(self.pool, page_size, enabled=enable_prefix_cache)
        self.scheduler = Scheduler(self.pool, self.cache, max_prefill_tokens, max_running)
        self.runner = ModelRunner(self.model, self.pool, self.backend, self.device)
        eos = set(self.spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(eos)
        self.special_tokens = special_tokens(self.tokenizer)  # {content: id}, for stop strings
        self.namespace: Any = 0  # bumped whenever the weights change, so stale KV is never reused
        self._rids = itertools.count()

    @classmethod
    def from_hf(cls, hf_model: Any, tokenizer: Any = None, **kwargs: Any) -> "Engine":
        """Build from an in-memory transformers LlamaForCausalLM (tests, random-weight benchmarks)."""
        return cls(model="in-memory", _hf_model=hf_model, _tokenizer=tokenizer, **kwargs)

    # -- construction helpers -------------------------------------------------------------
    def _load_weights(self, state: dict[str, torch.Tensor]) -> None:
        state = {k: v for k, v in state.items() if "rotary_emb" not in k}
        if self.spec.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the architecture: missing={missing[:5]} unexpected={unexpected[:5]}")
        self.model.to(self.device)

    def _num_pages(self, max_cache_tokens: int | None) -> int:
        return cache_pages(self.spec, self.device, self.dtype, self.page_size, max_cache_tokens)

    # -- tokens ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass token ids instead of strings")
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _chat_tokenizer(self) -> Any:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this engine's tokenizer has no chat_template: chat needs one")
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render a conversation with the model's chat template, ready for generation.

        The text already holds the template's special tokens (BOS included): to generate from it,
        use `chat` / `chat_ids`, or encode it without adding special tokens; `generate(text)` would
        add the tokenizer's BOS a second time, as transformers' `encode` does.
        """
        return self._chat_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids of a conversation: exactly `tokenizer.apply_chat_template(messages,
        tokenize=True, add_generation_prompt=True)` (the template's own BOS, never a second one)."""
        ids = self._chat_tokenizer().apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def chat(self, conversations: list[list[dict[str, str]]] | list[dict[str, str]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, **kw: Any) -> list[Completion]:
        """`generate` on chat conversations (one conversation, a list of messages, is accepted too)."""
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError(f"conversations must be a non-empty list of conversations, got {conversations!r}")
        if isinstance(conversations[0], dict):  # a single conversation, as vLLM's LLM.chat accepts
            conversations = [conversations]  # type: ignore[list-item]
        return self.generate([self.chat_ids(list(c)) for c in conversations], params, **kw)

    # -- generation ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]] | str,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        errors: str = "raise",
    ) -> list[Completion]:
        """Generate for every prompt with continuous batching.

        A bad request fails alone: the others still run. With errors="raise" (default) the first
        error is raised afterwards, carrying all results in `err.completions`; with
        errors="return" failed requests come back with finish_reason "error". If the call itself
        raises (KeyboardInterrupt, out of memory, ...), all its requests are aborted first: nothing
        stays queued, running, or holding KV pages, and the exception propagates unchanged.
        Stop strings follow vLLM (engine/stops.py): the text ends before the stop string unless
        `include_stop_str_in_output`; a stop string that is a special token (e.g. "<|im_end|>")
        matches that token.
        """
        if isinstance(prompts, (str, bytes)):
            prompts = [prompts]
        if params is None:
            params = SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        results: list[Completion | None] = [None] * len(prompts)
        first_error: Exception | None = None
        requests: dict[int, tuple[int, Request]] = {}
        with self._abort_on_error():
            for i, (prompt, p) in enumerate(zip(prompts, params_list)):
                try:
                    if not isinstance(p, SamplingParams):
                        raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
                    p.validate()
                    ids = validate_prompt(prompt, self)
                    req = self._make_request(ids, p)
                    self.scheduler.add(req)
                    requests[req.rid] = (i, req)
                except (TypeError, ValueError) as err:
                    err.args = (f"request {i}: {err}",)
                    first_error = first_error or err
                    results[i] = Completion("", [], 0, 0, "error", str(err))
            self._run_to_completion(len(requests), use_tqdm)
        for i, req in requests.values():
            results[i] = Completion(req.text, list(req.output_ids), len(req.prompt_ids), req.cached_tokens,
                                    req.finish_reason, stop_reason=req.stop_reason)
        if first_error is not None and errors == "raise":
            raise attach_completions(first_error, results)
        return results  # type: ignore[return-value]

    def _make_request(self, ids: list[int], p: SamplingParams, score_from: int | None = None) -> Request:
        gen = None
        if not p.greedy:
            gen = torch.Generator(device="cpu")
            # no seed: a fresh one from the OS, never from (or into) torch's / numpy's / random's global state
            gen.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        return Request(next(self._rids), ids, p, self.namespace, score_from=score_from, generator=gen)

    @contextmanager
    def _abort_on_error(self):
        """Any exception (KeyboardInterrupt and OOM included) aborts every queued or running request,
        so nothing of a failed call holds pages or cache locks, or runs in the next call; the
        exception itself propagates unchanged."""
        try:
            yield
        except BaseException as err:
            try:
                self.abort_all()
            except Exception as cleanup:  # never hide the original error behind a cleanup failure
                err.add_note(f"engine cleanup after this error failed too: {cleanup!r}")
            raise

    def abort_all(self) -> int:
        """Drop every waiting and running request (finish_reason "abort"); returns how many.

        Their pages and prefix-cache locks are given back; KV they published to the cache stays (it
        was fully computed). For callers that drive `step()` themselves; the engine's own calls do
        it when they raise.
        """
        return self.scheduler.abort_all()

    def _run_to_completion(self, total: int, use_tqdm: bool | None) -> None:
        show = use_tqdm if use_tqdm is not None else total > 1
        bar = tqdm(total=total, desc="generate", unit="req", disable=not show, leave=False)
        try:
            while self.scheduler.has_work():
                bar.update(self.step())
        finally:
            bar.close()

    def step(self) -> int:
        """One scheduler iteration; returns how many requests finished."""
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            if self.scheduler.has_work():
                raise self.scheduler.abort_stalled()
            return 0
        logits = self.runner.run(scheduled)
        finished = 0
        to_sample: list[tuple[Request, torch.Tensor]] = []
        for req, rows in zip(scheduled.requests, logits):
            req.num_computed = req.seq_len
            if req.is_scoring:
                self._score_rows(req, rows)
            else:
                if scheduled.mode == "extend":
                    self.scheduler.cache_computed(req)
                to_sample.append((req, rows[-1]))
        if to_sample:
            stacked = torch.stack([r for _, r in to_sample])
            reqs = [q for q, _ in to_sample]
            tokens = sample(stacked, [q.params for q in reqs], [q.generator for q in reqs])
            for req, tok in zip(reqs, tokens):
                self._append_token(req, tok)
        for req in scheduled.requests:
            if req.finished:
                self.scheduler.finish(req)
                finished += 1
        return finished

    def _score_rows(self, req: Request, rows: torch.Tensor) -> None:
        """A scoring request's log-probs from its logits rows; it is then finished."""
        # a queued copy (a blocking one would wait for the forward to finish)
        targets = torch.tensor(req.all_ids[req.score_from:]).to(rows.device, non_blocking=True)
        if req.keep_logits:
            req.logits = rows  # the caller reads them (on the device: no host sync here)
            rows = rows[: len(targets)]
        # [n] fp32 on the device; only the targets' log-probs are kept, not [n, vocab] rows
        req.token_logprobs = torch.log_softmax(rows, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        req.finish_reason = "stop"

    def _append_token(self, req: Request, token: int) -> None:
        """Record a sampled token and decide whether the request is done (token ids keep EOS and
        the tokens of a stop string; the text follows vLLM's rules, engine/stops.py)."""
        req.output_ids.append(token)
        p = req.params
        if token in p.stop_token_ids:
            req.finish_reason, req.stop_reason = "stop", token
        elif token in self.eos_token_ids and not p.ignore_eos:
            req.finish_reason = "stop"
        if self.tokenizer is not None:
            update_text(req, self.tokenizer, self.special_tokens)
        if req.finish_reason is None and (
            len(req.output_ids) >= p.max_tokens or req.seq_len >= self.spec.max_position_embeddings
        ):
            req.finish_reason = "length"

    # -- scoring ---------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """Sum of token log-probs of each candidate continuation given its prompt.

        Candidates are tokenized on their own and appended to the prompt's ids. The prompt's KV is
        computed once and every candidate reuses all of it (engine/candidates.py).
        """
        if len(prompts) != len(candidates):
            raise ValueError(f"got {len(prompts)} prompts but {len(candidates)} candidate lists")
        greedy = SamplingParams(max_tokens=1, temperature=0.0)

        def make(ids: list[int], *, score_from: int, keep_logits: bool = False) -> Request:
            req = self._make_request(ids, greedy, score_from=score_from)
            req.keep_logits = keep_logits
            self.scheduler.check_fits(req)
            return req

        groups: list[tuple[list[list[int]], list[Request]]] = []
        for i, (prompt, cands) in enumerate(zip(prompts, candidates)):
            ids = validate_prompt(prompt, self)
            if not cands:
                raise ValueError(f"candidates[{i}] is empty")
            cand_ids = [validate_prompt(c, self, field=f"candidates[{i}][{j}]", add_special_tokens=False)
                        for j, c in enumerate(cands)]
            groups.append((cand_ids, candidate_requests(ids, cand_ids, make)))
        reqs = [r for _, group in groups for r in group]
        with self._abort_on_error():
            for req in reqs:
                self.scheduler.add(req)
            self._run_to_completion(len(reqs), use_tqdm=None)
        return [[float(lp.sum()) for lp in candidate_token_logprobs(cand_ids, group)] for cand_ids, group in groups]

    def prompt_logits(self, prompts: Sequence[Sequence[int]], starts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """fp32 logits at every position p >= starts[i] of each prompt ([len - start, vocab]).

        Positions before `starts[i]` may come from the prefix cache; this is the engine's
        exact-logits probe used by the equivalence tests against transformers.
        """
        starts = list(starts) if starts is not None else [0] * len(prompts)
        reqs = []
        with self._abort_on_error():
            for i, (prompt, start) in enumerate(zip(prompts, starts)):
                ids = validate_prompt(prompt, self, field=f"prompts[{i}]")
                if not 0 <= start < len(ids):
                    raise ValueError(f"starts[{i}]={start} must be in [0, {len(ids)})")
                req = self._make_request(ids, SamplingParams(max_tokens=1, temperature=0.0), score_from=start + 1)
                req.keep_logits = True
                self.scheduler.add(req)
                reqs.append(req)
            self._run_to_completion(len(reqs), use_tqdm=False)
        self.last_requests = reqs
        return [r.logits.cpu() for r in reqs]

    def run_requests(self, requests: Sequence[Request],
                     perturbation: PerturbationTable | tuple[int, float] | None = None) -> None:
        """Run prepared requests to completion, optionally under MeZO perturbations applied with each
        request's `sign` and `perturbation_id`: a PerturbationTable (P sample seeds and eps), or one
        perturbation as (step_seed, eps). Used by the MeZO trainer; submit requests grouped by
        perturbation id (rows of one id then share the kernels' tiles). ValueError (before anything
        runs) for a seed outside [0, 2^63) (noise seeds are int64 Philox keys), a non-finite eps, or
        a request whose perturbation_id is not in [0, P)."""
        table = None
        if perturbation is not None:
            table = PerturbationTable.of(perturbation)
            for i, req in enumerate(requests):
                pid = req.perturbation_id
                if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < table.size:
                    raise ValueError(f"requests[{i}].perturbation_id={pid!r} must be an int in [0, {table.size}) "
                                     f"(the launch carries {table.size} perturbation(s))")
        try:
            with self._abort_on_error():
                for req in requests:
                    self.scheduler.add(req)
                self.runner.perturbation = table
                self._run_to_completion(len(requests), use_tqdm=False)
        finally:
            self.runner.perturbation = None

    def new_request(self, ids: list[int], params: SamplingParams | None = None, **fields: Any) -> Request:
        """A request in the current weight namespace (fields: score_from, keep_logits, sign, perturbation_id,
        namespace)."""
        score_from = fields.pop("score_from", None)
        req = self._make_request(ids, params or SamplingParams(max_tokens=1, temperature=0.0), score_from)
        for k, v in fields.items():
            setattr(req, k, v)
        return req

    # -- introspection -----------------------------------------------------------------------
    def cache_stats(self) -> dict[str, Any]:
        stats = dict(self.cache.stats())
        stats.update(
            total_pages=self.pool.num_usable_pages,
            free_pages=self.pool.num_free_pages,
            page_size=self.page_size,
            tokens_computed=self.runner.tokens_computed,
            forward_passes=self.runner.forward_passes,
            preemptions=self.scheduler.num_preemptions,
        )
        return stats

    def reset_cache(self) -> None:
        """Drop every cached prefix (e.g. after the weights changed)."""
        self.cache.reset()
