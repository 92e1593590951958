"""Shared helpers for the MeZO acceptance tests (tests/test_mezo_*.py)."""
from __future__ import annotations

import copy
import functools

import torch

from mezo_fixtures import FEW_SHOT, HEADLINES, tiny_text_engine


@functools.lru_cache(maxsize=1)
def _base():
    """The tiny HF model + tokenizer behind `tiny_text_engine()` (built once per process)."""
    engine, hf, tok = tiny_text_engine()
    return hf, tok


def make_engine(**engine_kw):
    """A fresh engine over the SAME weights as `tiny_text_engine()` (seed 0), fp32, on CPU unless
    `device` is given."""
    from engine import Engine

    hf, tok = _base()
    engine_kw.setdefault("max_cache_tokens", 16384)
    engine_kw.setdefault("dtype", "float32")
    engine_kw.setdefault("device", "cpu")
    return Engine.from_hf(hf, tok, **engine_kw)


def base_hf():
    """A private deep copy of the tiny transformers model (peft mutates the model it wraps)."""
    return copy.deepcopy(_base()[0])


def tokenizer():
    return _base()[1]


def randomize_lora_b(engine, std: float = 0.05, seed: int = 1) -> None:
    """Give the adapter a nonzero B (PEFT init has B = 0, which hides half the perturbation)."""
    g = torch.Generator().manual_seed(seed)
    values = {}
    for k, v in engine.trainable_parameters().items():
        values[k] = (torch.randn(v.shape, generator=g) * std).to(v.device) if "lora_B" in k else v.clone()
    engine.set_trainable(values)


def snapshot(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.trainable_parameters().items()}


def long_prefix(tok, min_tokens: int = 256) -> str:
    """A few-shot prompt of at least `min_tokens` tokens (FEW_SHOT plus more solved headlines)."""
    shots = ["Headline: Rivals draw in tense derby\nTopic: sport\n",
             "Headline: Retailer warns of weaker sales\nTopic: business\n",
             "Headline: Actor wins award for debut role\nTopic: entertainment\n",
             "Headline: Software flaw puts millions of laptops at risk\nTopic: tech\n",
             "Headline: Opposition leader calls for inquiry\nTopic: politics\n"]
    text, i = FEW_SHOT, 0
    while len(tok.encode(text, add_special_tokens=False)) < min_tokens:
        text += shots[i % len(shots)]
        i += 1
    return text


MORE_HEADLINES = ["Coach sacked after heavy defeat", "Singer tops the charts again", "Carmaker recalls electric vans",
                  "Prime minister faces tough questions", "Museum unveils lost painting", "Tennis star retires at thirty",
                  "Start-up raises funds for robot cleaners", "Voters head to the polls in by-election",
                  "Streaming service loses subscribers", "Hackers target hospital computers"]
ALL_HEADLINES = list(HEADLINES) + MORE_HEADLINES  # 16 distinct headlines


def classification_examples(prefix: str, candidates: list[str], n: int | None = None):
    """`n` (default 6, at most 16) examples with distinct headlines after the shared `prefix`."""
    from mezo import ClassificationExample

    heads = ALL_HEADLINES[:len(HEADLINES) if n is None else n]
    assert len(heads) == (n or len(HEADLINES))
    return [ClassificationExample(f"{prefix}Headline: {h}\nTopic:", list(candidates), i % len(candidates))
            for i, h in enumerate(heads)]


def hf_loss(model, encoded, objective: str = "classification") -> torch.Tensor:
    """The loss of mezo/objectives.py computed on a transformers (or PEFT) model, differentiably.

    classification: mean token log-prob of each candidate, cross-entropy over candidates, mean over
    examples; lm: mean CE of the target tokens, mean over examples.
    """
    def mean_logprob(prompt: list[int], cont: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + cont])
        # logits of the last len(cont)+1 positions; the first len(cont) of them predict `cont`
        logits = model(input_ids=ids, logits_to_keep=len(cont) + 1).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return logp[torch.arange(len(cont)), torch.tensor(cont)].mean()

    losses = []
    for ex in encoded:
        if objective == "lm":
            losses.append(-mean_logprob(ex.prompt, ex.target))
            continue
        scores = torch.stack([mean_logprob(ex.prompt, c) for c in ex.candidates])
        losses.append(-torch.log_softmax(scores, dim=-1)[ex.label])
    return torch.stack(losses).mean()


def peft_adapter(path, **lora_config):
    """A PEFT LoRA adapter on `base_hf()` (LoraConfig(**lora_config), no dropout) with B drawn at random,
    so it changes the model (PEFT initialises B = 0), saved by PEFT under ``path``; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    model = get_peft_model(base_hf(), LoraConfig(lora_dropout=0.0, **lora_config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return model


def assert_replays(out_dir, records, config) -> None:
    """A finetune run in `out_dir` moved its adapter, and replaying its trajectory `records` from the
    initial checkpoint on a fresh engine gives the saved adapter within 1e-6."""
    from safetensors.torch import load_file

    from mezo import replay_trajectory

    initial = load_file(out_dir / "checkpoints" / "initial.safetensors")
    replayed = replay_trajectory(make_engine(), initial, records, config)
    final = load_file(out_dir / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    for k in final:
        torch.testing.assert_close(replayed[k], final[k], rtol=0, atol=1e-6)


def assert_step_refused(trainer, encoded, match: str) -> None:
    """trainer.step(encoded) raises ValueError matching `match` before anything runs: no forward pass,
    no step counted, the trainable tensors untouched."""
    import pytest

    engine = trainer.engine
    before, passes = snapshot(engine), engine.runner.forward_passes
    with pytest.raises(ValueError, match=match):
        trainer.step(encoded)
    assert engine.runner.forward_passes == passes and trainer.step_count == 0
    assert all(torch.equal(v, before[k]) for k, v in engine.trainable_parameters().items())


TOPICS = [" business", " entertainment", " politics", " sport", " tech"]  # BBC topics, one token each


def perturbation_trainer(mode: str, kernels: str = "torch", **cfg):
    """A MeZOTrainer on a fresh tiny engine with the perturbation tests' settings (eps 1e-2 / lr 1e-3
    for LoRA, 1e-3 / 1e-5 for full; seed 7; `cfg` overrides), LoRA B randomized so z_B matters."""
    from mezo import MeZOConfig, MeZOTrainer

    engine = make_engine(kernels=kernels)
    cfg = {"mode": mode, "eps": 1e-2 if mode == "lora" else 1e-3, "lr": 1e-3 if mode == "lora" else 1e-5,
           "seed": 7, **cfg}
    trainer = MeZOTrainer(engine, MeZOConfig(**cfg))
    if mode == "lora":
        randomize_lora_b(engine)
    return trainer
