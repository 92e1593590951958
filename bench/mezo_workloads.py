"""Workloads of bench_mezo.py, built inside each contestant's process: the model (one set of weights
for every contestant), the scenarios' examples, the reference MeZO step on transformers+PEFT and the
engine's MeZOTrainer built on them, and the engine's plain unperturbed forward of the same 2xB
sequences. Everything is deterministic given (model, scenario, sizes), so every process rebuilds
exactly the same workload.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.synthetic import SyntheticTokenizer, examples as synthetic_examples
from bench.baselines.hf_loop import HFLoopMeZO, ScoredBatch, build_scored_batch
from bench.baselines.reference_mezo import RefBatch, ReferenceMeZO, build_batch
from engine import Engine
from mezo import MeZOConfig
from mezo.data import (BBC_TOPICS, ClassificationExample, LMExample, bbc_article_lines, bbc_news_rows,
                       bbc_split, load_examples)
from mezo.objectives import EncodedExample, example_loss, scoring_requests
from mezo.trainer import MeZOTrainer

# SCENARIOS, ModelRef, Sizes are re-exported for the contestant processes (bench/mezo_worker.py).
from bench.mezo_scenarios import CACHE_ROOT, FULL_MODE_MODULES, RANDOM_CONFIGS, VOCAB, ModelRef, Scenario  # noqa: F401
from bench.mezo_scenarios import SCENARIOS, Sizes  # noqa: F401


def mezo_config(scenario: Scenario) -> MeZOConfig:
    return MeZOConfig.preset(scenario.preset, objective=scenario.objective, steps=1000)


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
    b = sizes.batch_size
    if isinstance(tokenizer, SyntheticTokenizer):  # no tokenizer / corpus on this machine: random ids
        return synthetic_examples(scenario.key, b, sizes.shots, (sizes.lm_prompt_tokens, sizes.lm_target_tokens),
                                  len(tokenizer))
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
    path "synthetic": token ids spelled as text (bench/synthetic.py), for machines without either."""
    from transformers import AutoTokenizer

    if path == "synthetic":
        return SyntheticTokenizer(VOCAB)
    return AutoTokenizer.from_pretrained(str(path) if path else str(_tokenizer_dir()))


def _weights_file(model: str, dtype: str) -> Path:
    return CACHE_ROOT / f"{hashlib.sha1(model.encode()).hexdigest()[:10]}-{dtype}" / "model.pt"


def build_hf_model(ref: ModelRef) -> Any:
    """The transformers LlamaForCausalLM on ref.device in ref.dtype, eval mode.

    Built-in/GGUF models are dequantized once and cached as a torch file (the GGUF conversion takes
    about a minute on 2 cores); random configs are rebuilt from the seed (same weights every time).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = ref.torch_dtype
    if ref.random_config is not None:
        cfg = LlamaConfig(**RANDOM_CONFIGS[ref.random_config], vocab_size=VOCAB, max_position_embeddings=8192,
                          rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(ref.seed)
        with torch.device(ref.device):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        return model.eval()
    cache = _weights_file(ref.model, ref.dtype)
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
                 prefix_cache: bool = True, cache_tokens: int | None = None) -> tuple[MeZOTrainer, list[EncodedExample]]:
    """Engine on the transformers model's weights (Engine.from_hf copies them), with the trainer's
    LoRA (PEFT init, seed cfg.seed) or full-parameter mode attached."""
    cfg = mezo_config(scenario)
    if cache_tokens is None:  # size the KV pool for this batch: every sequence of both branches, unshared
        cache_tokens = kv_tokens_needed(encode_examples(tok, examples))
    engine = Engine.from_hf(hf, tok, dtype=ref.torch_dtype, device=ref.device, max_cache_tokens=cache_tokens,
                            enable_prefix_cache=prefix_cache)
    trainer = MeZOTrainer(engine, cfg)
    return trainer, trainer.encode(examples)


class _TokenizerOnly:
    """What `mezo.objectives.encode` needs of an engine: `encode` and `tokenizer`."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))


def encode_examples(tok: Any, examples: list) -> list[EncodedExample]:
    from mezo.objectives import encode

    return [encode(_TokenizerOnly(tok), ex) for ex in examples]  # type: ignore[arg-type]


def _peft_name(engine_key: str) -> str:
    """'base_model.model.X.lora_A.weight' -> PEFT's parameter name 'base_model.model.X.lora_A.default.weight'."""
    head, ab, _ = engine_key.rsplit(".", 2)
    return f"{head}.{ab}.default.weight"


def _trainable_copy(hf: Any, scenario: Scenario, lora_init: dict[str, torch.Tensor] | None) -> Any:
    """A copy of the transformers model with the engine's trainable tensors: PEFT LoRA holding the
    engine's adapter values (`lora_init`, keyed as the engine names them), or every decoder projection
    weight (full mode: the tensors the engine's full-parameter mode perturbs)."""
    cfg = mezo_config(scenario)
    model = copy.deepcopy(hf)
    if scenario.mode == "lora":
        import peft

        with warnings.catch_warnings():  # transformers' FutureWarning about a PEFT internal
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules),
                lora_dropout=0.0))
        if lora_init is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for key, value in lora_init.items():
                    params[_peft_name(key)].copy_(value)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".weight") and name.split(".")[-2] in FULL_MODE_MODULES)
    return model.eval()


def build_hf_loop(hf: Any, tok: Any, ref: ModelRef, scenario: Scenario, examples: list,
                  lora_init: dict[str, torch.Tensor] | None = None) -> tuple[HFLoopMeZO, ScoredBatch]:
    """The competent transformers loop (bench/baselines/hf_loop.py) on the same weights and adapter."""
    cfg = mezo_config(scenario)
    model = _trainable_copy(hf, scenario, lora_init)
    batch = build_scored_batch(examples, lambda s: list(tok.encode(s)),
                               lambda s: list(tok.encode(s, add_special_tokens=False)), pad_id=tok.pad_token_id or 0)
    return HFLoopMeZO(model, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay), batch.to(ref.device)


def build_baseline(hf: Any, tok: Any, ref: ModelRef, scenario: Scenario, examples: list,
                   lora_init: dict[str, torch.Tensor] | None = None) -> tuple[ReferenceMeZO, RefBatch]:
    """ReferenceMeZO on a copy of the transformers model: PEFT LoRA with the engine's adapter values
    (`lora_init`, keyed as the engine names them), or every decoder projection weight trainable
    (full mode: the same tensors the engine's full-parameter mode perturbs)."""
    cfg = mezo_config(scenario)
    model = _trainable_copy(hf, scenario, lora_init)
    mezo = ReferenceMeZO(model, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    batch = build_batch(examples, lambda s: list(tok.encode(s)), pad_id=tok.pad_token_id or 0,
                        encode_continuation=lambda s: list(tok.encode(s, add_special_tokens=False)))
    batch.input_ids = batch.input_ids.to(ref.device)
    batch.attention_mask = batch.attention_mask.to(ref.device)
    return mezo, batch


def sub_batch(batch: RefBatch, examples: int) -> RefBatch:
    """The rows of the first `examples` examples, at the full batch's padded width (so a row costs what
    it costs in the full batch and the full step time is the sub-batch's × B / examples)."""
    if batch.num_options is None:
        rows = examples
    else:
        rows = sum(batch.num_options[:examples])
    return RefBatch(batch.input_ids[:rows], batch.attention_mask[:rows], batch.lengths[:rows],
                    batch.target_lens[:rows],
                    None if batch.labels is None else batch.labels[:examples],
                    None if batch.num_options is None else batch.num_options[:examples])


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
    facts: dict[str, Any] = {
        "prompt_tokens_mean": sum(len(e.prompt) for e in encoded) / len(encoded),
        "prompt_tokens_max": max(len(e.prompt) for e in encoded),
        "single_token_candidates": all(e.single_token for e in encoded) if scenario.objective == "classification" else None,
    }
    if scenario.objective == "lm":
        facts["target_tokens_mean"] = sum(len(e.target or []) for e in encoded) / len(encoded)
    common = encoded[0].prompt
    for e in encoded[1:]:
        n = next((i for i, (x, y) in enumerate(zip(common, e.prompt)) if x != y), min(len(common), len(e.prompt)))
        common = common[:n]
    facts["shared_prefix_tokens"] = len(common)
    return facts


def trainable_numel(trainer: MeZOTrainer) -> int:
    return sum(t.numel() for t in trainer.params.values())
