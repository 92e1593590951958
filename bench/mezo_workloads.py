"""Workloads of bench_mezo.py (and bench_estimators.py, bench_distributed.py): the scenarios and their
sizes, the model (one set of weights for every contestant), the examples, and the contestants: the
reference MeZO step on transformers+PEFT, the careful transformers loop, the engine's MeZOTrainer on the
same weights, and the engine's plain unperturbed forward of the same 2xB sequences. Deterministic given
(model, scenario, sizes), so the memory probe's fresh process (`peak_memory`) rebuilds exactly the
contestant the benchmark timed. Cheap to import (transformers and peft load lazily).

Machines without SmolLM2's tokenizer or the BBC corpus (the GPU machine) use synthetic workloads: token
ids written as text ("17 845 77", `SyntheticTokenizer`) in the BBC scenarios' shapes (~16-token prompts
with 5 single-token candidates, the same behind a shared >= 512-token prompt, 128 + 128-token LM
windows). Throughput does not depend on token values.
"""
from __future__ import annotations

import copy
import ctypes
import functools
import gc
import hashlib
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bench.baselines.hf_loop import HFLoopMeZO, ScoredBatch, build_scored_batch
from bench.baselines.reference_mezo import RefBatch, ReferenceMeZO, build_batch
from bench.common import DTYPES, random_llama, timed
from engine import Engine
from mezo import MeZOConfig
from mezo.data import (BBC_TOPICS, ClassificationExample, LMExample, bbc_article_lines, bbc_news_rows,
                       bbc_split, load_examples)
from mezo.objectives import EncodedExample, encode, example_loss, scoring_requests
from mezo.trainer import MeZOTrainer

VOCAB = 49152  # random configs use SmolLM2's tokenizer (or synthetic ids in its range)
CACHE_ROOT = Path(tempfile.gettempdir()) / "mezo_bench_cache"
FULL_MODE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    objective: str  # "classification" | "lm"
    mode: str  # "lora" | "full"
    preset: str  # MeZOConfig preset: lr/eps of both sides


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("cls", "1. BBC headline classification (LoRA)", "classification", "lora", "opt-lora"),
    Scenario("cls_16shot", "2. BBC classification, 16-shot shared prompt (LoRA)", "classification", "lora",
             "opt-lora"),
    Scenario("lm_256", "3. LM loss, 256-token BBC article windows (LoRA)", "lm", "lora", "opt-lora"),
    Scenario("cls_full", "4. BBC headline classification, full-parameter", "classification", "full", "opt-full"),
)}


@dataclass(frozen=True)
class Sizes:
    batch_size: int = 16
    shots: int = 16
    lm_prompt_tokens: int = 128
    lm_target_tokens: int = 128


@dataclass
class ModelRef:
    """How to (re)build the same transformers model: a built-in name or a random config + seed."""

    model: str | None
    random_config: str | None
    dtype: str
    device: str
    seed: int = 0
    tokenizer_path: str | None = None
    vocab_size: int = VOCAB  # random configs only
    context: int = 8192

    @property
    def label(self) -> str:
        return self.model or f"random-{self.random_config}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def mezo_config(scenario: Scenario) -> MeZOConfig:
    return MeZOConfig.preset(scenario.preset, objective=scenario.objective, steps=1000)


# -- examples ---------------------------------------------------------------------------------------
class SyntheticTokenizer:
    """What the engine and the baselines need of a tokenizer, over ids spelled as decimal text
    (pad 0, bos 1, eos 2; content ids start at 3)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [int(t) for t in text.split()]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids if not (skip_special_tokens and int(i) < 3))


@functools.lru_cache(maxsize=1)
def _bbc_train_articles() -> list[tuple[str, str]]:
    """(topic, full text) of the fixed bbc_news train split, in the order of `bbc_news_rows('train')`."""
    return [(topic, "\n".join(lines)) for topic, _, lines in bbc_split(bbc_article_lines(), "train")]


def fewshot_prefix(batch_size: int, shots: int) -> str:
    """Instruction + `shots` labelled training articles (headline, lead, topic), none from the batch;
    topics taken round-robin so each appears."""
    rows = bbc_news_rows("train", "headline_lead")[batch_size:]
    by_topic = {t: [r for r in rows if BBC_TOPICS[r["label"]] == t] for t in BBC_TOPICS}
    demos = [by_topic[BBC_TOPICS[i % len(BBC_TOPICS)]][i // len(BBC_TOPICS)] for i in range(shots)]
    head = ("Classify the topic of each BBC News article as business, entertainment, politics, sport "
            "or tech.\n\n")
    return head + "".join(f"{d['prompt']} {BBC_TOPICS[d['label']]}\n\n" for d in demos)


def build_examples(scenario: Scenario, sizes: Sizes, tokenizer: Any) -> list[ClassificationExample | LMExample]:
    """The scenario's batch from BBC News; with a SyntheticTokenizer (no tokenizer / corpus on this
    machine) random ids in the same shapes (a shot is ~40 tokens, five single-token labels)."""
    b = sizes.batch_size
    if isinstance(tokenizer, SyntheticTokenizer):
        rng = random.Random(0)
        def text(n: int) -> str:  # ids from 8 up: clear of the labels
            return " ".join(str(rng.randrange(8, len(tokenizer))) for _ in range(n))

        if scenario.key == "lm_256":
            return [LMExample(text(sizes.lm_prompt_tokens), " " + text(sizes.lm_target_tokens)) for _ in range(b)]
        fewshot = scenario.key == "cls_16shot"
        prefix = text(max(512, 40 * sizes.shots)) + " " if fewshot else ""
        return [ClassificationExample(prefix + text(rng.randint(30, 50) if fewshot else rng.randint(10, 22)),
                                      [f" {3 + i}" for i in range(5)], i % 5) for i in range(b)]
    if scenario.key in ("cls", "cls_full"):
        return load_examples("bbc_news", "classification", limit=b)
    if scenario.key == "cls_16shot":
        prefix = fewshot_prefix(b, sizes.shots)
        rows = bbc_news_rows("train", "headline_lead")[:b]  # the same articles as scenario 1
        return [ClassificationExample(prefix + r["prompt"], r["candidates"], r["label"]) for r in rows]
    if scenario.key == "lm_256":
        p, t = sizes.lm_prompt_tokens, sizes.lm_target_tokens
        out = []
        for _, text in _bbc_train_articles():
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) >= p + t:
                out.append(LMExample(tokenizer.decode(ids[:p]), tokenizer.decode(ids[p:p + t])))
            if len(out) == b:
                return out
        raise ValueError(f"fewer than {b} BBC articles have {p + t} tokens")
    raise ValueError(f"unknown scenario {scenario.key!r}")


# -- model and tokenizer (cached under the temp dir so subprocesses load them in seconds) ----------
def _tokenizer_dir() -> Path:
    d = CACHE_ROOT / "smollm2-tokenizer"
    if not (d / "tokenizer.json").is_file():
        from engine.loader import load_tokenizer as load_gguf_tokenizer, resolve_model

        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE_ROOT))
        load_gguf_tokenizer(resolve_model("smollm2-135m")).save_pretrained(tmp)
        try:
            tmp.rename(d)
        except OSError:  # another process got there first
            pass
    return d


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None) -> Any:
    """SmolLM2's tokenizer (or the one saved at `path`), from a save_pretrained copy of the GGUF's;
    path "synthetic": token ids spelled as text (SyntheticTokenizer), for machines without either."""
    from transformers import AutoTokenizer

    if path == "synthetic":
        return SyntheticTokenizer(VOCAB)
    return AutoTokenizer.from_pretrained(str(path) if path else str(_tokenizer_dir()))


def build_hf_model(ref: ModelRef) -> Any:
    """The transformers LlamaForCausalLM on ref.device in ref.dtype, eval mode.

    Built-in/GGUF models are dequantized once and cached as a torch file (the GGUF conversion takes
    about a minute on 2 cores); random configs are rebuilt from the seed (same weights every time).
    """
    from transformers import AutoModelForCausalLM

    dtype = ref.torch_dtype
    if ref.random_config is not None:
        return random_llama(ref.random_config, ref.vocab_size, ref.context, dtype, ref.device, ref.seed)
    cache = CACHE_ROOT / f"{hashlib.sha1(ref.model.encode()).hexdigest()[:10]}-{ref.dtype}" / "model.pt"
    if cache.is_file():
        from transformers import CONFIG_MAPPING

        blob = torch.load(cache, map_location="cpu", weights_only=False)
        cfg = CONFIG_MAPPING[blob["config"]["model_type"]].from_dict(blob["config"])
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.load_state_dict(blob["state"], strict=False)
        model.tie_weights()
        return model.to(ref.device).eval()
    from engine.loader import resolve_model

    source = resolve_model(ref.model)
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, **kw).eval()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"config": model.config.to_dict(), "state": model.state_dict()}, tmp)
    tmp.replace(cache)
    return model.to(ref.device).eval()


# -- contestants ----------------------------------------------------------------------------------
def kv_tokens_needed(encoded: list[EncodedExample], page_size: int = 16) -> int:
    """KV slots for all 2×B requests of a step with no sharing at all (+1 page each for slack)."""
    total = 0
    for ex in encoded:
        rows = [ex.prompt + (ex.target or [])] if ex.candidates is None \
            else [ex.prompt] + [ex.prompt + c for c in ex.candidates if len(c) > 1]
        total += sum((-(-len(r) // page_size) + 1) * page_size for r in rows)
    return 2 * total + 4 * page_size


def build_engine(hf: Any, tok: Any, ref: ModelRef, scenario: Scenario, examples: list, *,
                 prefix_cache: bool = True, cache_tokens: int | None = None,
                 trainer_cls: Any = MeZOTrainer) -> tuple[MeZOTrainer, list[EncodedExample]]:
    """Engine on the transformers model's weights (Engine.from_hf copies them), with the trainer's
    LoRA (PEFT init, seed cfg.seed) or full-parameter mode attached; `trainer_cls(engine, cfg)` builds
    the trainer (mezo.distributed.make_trainer for data-parallel ranks)."""
    cfg = mezo_config(scenario)
    if cache_tokens is None:  # size the KV pool for this batch: every sequence of both branches, unshared
        cache_tokens = kv_tokens_needed(encode_examples(tok, examples))
    engine = Engine.from_hf(hf, tok, dtype=ref.torch_dtype, device=ref.device, max_cache_tokens=cache_tokens,
                            enable_prefix_cache=prefix_cache)
    trainer = trainer_cls(engine, cfg)
    return trainer, trainer.encode(examples)


def encode_examples(tok: Any, examples: list) -> list[EncodedExample]:
    """The examples as the engine encodes them (`mezo.objectives.encode` needs only these two of an engine)."""
    like_engine = SimpleNamespace(tokenizer=tok, encode=lambda text: list(tok.encode(text)))
    return [encode(like_engine, ex) for ex in examples]  # type: ignore[arg-type]


def build_baseline(hf: Any, tok: Any, ref: ModelRef, scenario: Scenario, examples: list,
                   lora_init: dict[str, torch.Tensor] | None = None,
                   loop: bool = False) -> tuple[ReferenceMeZO, RefBatch] | tuple[HFLoopMeZO, ScoredBatch]:
    """ReferenceMeZO (bench/baselines/reference_mezo.py) or, loop=True, the competent transformers loop
    (bench/baselines/hf_loop.py), on a copy of the transformers model with the engine's trainable
    tensors: PEFT LoRA holding the engine's adapter values (`lora_init`, keyed as the engine names
    them), or every decoder projection weight (full mode: the tensors the engine's full-parameter mode
    perturbs)."""
    cfg = mezo_config(scenario)
    model = copy.deepcopy(hf)
    if scenario.mode == "lora":
        import peft

        with warnings.catch_warnings():  # transformers' FutureWarning about a PEFT internal
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules),
                lora_dropout=0.0))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in (lora_init or {}).items():  # engine 'X.lora_A.weight' is PEFT's 'X.lora_A.default.weight'
                head, ab, _ = key.rsplit(".", 2)
                params[f"{head}.{ab}.default.weight"].copy_(value)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".weight") and name.split(".")[-2] in FULL_MODE_MODULES)
    enc, cont = (lambda s: list(tok.encode(s))), (lambda s: list(tok.encode(s, add_special_tokens=False)))
    pad, kw = tok.pad_token_id or 0, dict(lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if loop:
        return HFLoopMeZO(model.eval(), **kw), build_scored_batch(examples, enc, cont, pad_id=pad).to(ref.device)
    batch = build_batch(examples, enc, pad_id=pad, encode_continuation=cont)
    batch.input_ids, batch.attention_mask = batch.input_ids.to(ref.device), batch.attention_mask.to(ref.device)
    return ReferenceMeZO(model.eval(), **kw), batch


def sub_batch(batch: RefBatch, examples: int) -> RefBatch:
    """The rows of the first `examples` examples, at the full batch's padded width (so a row costs what
    it costs in the full batch and the full step time is the sub-batch's × B / examples)."""
    rows = examples if batch.num_options is None else sum(batch.num_options[:examples])
    cut = lambda v, n: None if v is None else v[:n]  # noqa: E731
    return RefBatch(batch.input_ids[:rows], batch.attention_mask[:rows], batch.lengths[:rows],
                    batch.target_lens[:rows], cut(batch.labels, examples), cut(batch.num_options, examples))


def plain_forward(trainer: MeZOTrainer, encoded: list[EncodedExample]) -> float:
    """The same 2×B request set as a MeZO step (two branch namespaces, so the same prefix sharing),
    unperturbed and without the update: what inference on that batch costs. Returns the mean loss."""
    eng = trainer.engine
    groups, flat = [], []
    for branch in (1, -1):
        ns = ("bench-forward", branch, eng.namespace)
        reqs = [scoring_requests(eng, ex, 0.0, ns) for ex in encoded]
        groups.append(reqs)
        flat.extend(r for g in reqs for r in g)
    eng.run_requests(flat)
    losses = [torch.stack([example_loss(ex, r) for ex, r in zip(encoded, g)]).mean() for g in groups]
    eng.cache.reset()
    return float(sum(losses) / 2)


def describe(scenario: Scenario, encoded: list[EncodedExample]) -> dict[str, Any]:
    """Token facts of a scenario's batch (as the engine tokenizes it)."""
    cls = scenario.objective == "classification"
    return {"prompt_tokens_mean": sum(len(e.prompt) for e in encoded) / len(encoded),
            "prompt_tokens_max": max(len(e.prompt) for e in encoded),
            "single_token_candidates": all(e.single_token for e in encoded) if cls else None,
            **({} if cls else {"target_tokens_mean": sum(len(e.target or []) for e in encoded) / len(encoded)}),
            "shared_prefix_tokens": len(os.path.commonprefix([e.prompt for e in encoded]))}


# -- one contestant, and its peak memory in a fresh process ------------------------------------------


class Contestant:
    """One side of a scenario, built from a spec of plain data (so that a fresh process builds the
    same): model (ModelRef fields), scenario, sizes (Sizes fields), role ("baseline", "hf_loop",
    "engine", "engine_forward" or "engine_no_prefix_cache"), threads; optional: examples (run on the
    first N examples only; the step time is scaled by B / N), lora_init (file with the engine's initial
    adapter: the two transformers sides read it), save_lora_init (file to write that adapter to)."""

    def __init__(self, spec: dict[str, Any]):
        ref = ModelRef(**spec["model"])
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        self.device, self.role = ref.device, spec["role"]
        scenario = SCENARIOS[spec["scenario"]]
        tok = load_tokenizer(ref.tokenizer_path)
        examples = build_examples(scenario, Sizes(**spec["sizes"]), tok)
        k = spec.get("examples") or len(examples)
        self.scale = len(examples) / k
        self.calls: list[tuple[float, int]] = []  # (seconds, tokens computed) of the timed calls
        self.warmups: list[tuple[float, int]] = []
        hf = build_hf_model(ref)
        self.info: dict[str, Any] = {"model_params": sum(p.numel() for p in hf.parameters()),
                                     "layers": hf.config.num_hidden_layers, "hidden": hf.config.hidden_size}
        init = torch.load(spec["lora_init"]) if spec.get("lora_init") else None
        if self.role == "baseline":
            self.mezo, batch = build_baseline(hf, tok, ref, scenario, examples, init)
            self.batch = sub_batch(batch, k) if k < len(examples) else batch
            vocab = hf.get_output_embeddings().weight.shape[0]
            rows, width = batch.input_ids.shape
            self.info.update(reference_rows=int(rows), reference_width=int(width),
                             reference_logits_bytes=int(batch.input_ids.numel()) * vocab * 4,
                             workload_tokens_per_step=2 * sum(batch.lengths),
                             reference_trainable_params=sum(p.numel() for _, p in self.mezo.params))
        elif self.role == "hf_loop":
            self.mezo, self.batch = build_baseline(hf, tok, ref, scenario, examples, init, loop=True)
        else:
            full_encoded = encode_examples(tok, examples)
            self.trainer, self.encoded = build_engine(
                hf, tok, ref, scenario, examples[:k], prefix_cache=self.role != "engine_no_prefix_cache",
                cache_tokens=kv_tokens_needed(full_encoded))
            eng = self.trainer.engine
            self.info.update(describe(scenario, full_encoded), attention_backend=eng.backend.name,
                             trainable_params=sum(t.numel() for t in self.trainer.params.values()),
                             kv_pool_tokens=eng.pool.num_usable_pages * eng.page_size)
            if spec.get("save_lora_init") and scenario.mode == "lora":
                torch.save({n: t.detach().cpu().clone() for n, t in self.trainer.params.items()},
                           spec["save_lora_init"])
        del hf
        gc.collect()

    def run(self, i: int) -> int:
        """Call i (< 0: warm-up); returns the tokens it pushed through the model."""
        if self.role in ("baseline", "hf_loop"):
            self.mezo.step(self.batch, seed=1000 + i)
            return 2 * int(self.batch.input_ids.numel())
        if self.role != "engine_forward":
            return self.trainer.step(self.encoded)["tokens_computed"]
        t0 = self.trainer.engine.runner.tokens_computed
        plain_forward(self.trainer, self.encoded)
        return self.trainer.engine.runner.tokens_computed - t0

    def call(self, i: int) -> tuple[float, int]:
        """(seconds, tokens computed) of call i, timed by bench.common.bench_seconds."""
        tokens, seconds = timed(lambda: self.run(i), self.device)
        return seconds, tokens


def _status_bytes(field: str) -> int | None:
    """A byte count of /proc/self/status (Linux), e.g. VmRSS or VmHWM; None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            return next((int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":")), None)
    except OSError:
        return None


def peak_memory(spec: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Run in a fresh process (bench_mezo starts one per contestant, so peaks never mix): build the
    contestant, make `warmup` calls, then measure one call. Bytes, absolute (interpreter, weights, KV
    pool, temporaries); `before_bytes` is the level just before the call.

    GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU (Linux): peak RSS, i.e.
    VmHWM after "5" was written to /proc/self/clear_refs (which resets it to the current RSS). Before
    the call the glibc heap is trimmed (malloc_trim(0)): glibc keeps freed mid-size buffers, so the
    peak would also count what the build and the warm-up freed; the amount trimmed is
    `heap_retained_bytes`. `noise_cache_bytes`: what the torch path's noise memo holds after the call."""
    c = Contestant(spec)
    for i in range(warmup):
        c.run(-1 - i)
    gc.collect()
    out: dict[str, Any] = {"pid": os.getpid(), "heap_retained_bytes": 0}
    if str(c.device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out.update(before_bytes=torch.cuda.memory_allocated(), method="torch.cuda.max_memory_allocated")
        c.run(0)
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        rss = _status_bytes("VmRSS")
        if rss is None:
            raise RuntimeError("peak memory on a CPU is read from /proc/self/status, which only Linux has")
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["before_bytes"] = _status_bytes("VmRSS")
        out["heap_retained_bytes"] = max(0, rss - out["before_bytes"])
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := current RSS
        c.run(0)
        out.update(peak_bytes=_status_bytes("VmHWM"), method="peak RSS (VmHWM, reset through /proc/self/clear_refs)")
    from kernels import noise_cache

    out["delta_bytes"] = max(0, out["peak_bytes"] - out["before_bytes"])
    return {**out, "noise_cache_bytes": int(noise_cache._cache_bytes)}
