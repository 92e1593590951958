"""PEFT interoperability (DESIGN §11): the engine's adapter after MeZO steps loads in
`peft.PeftModel.from_pretrained` with the same logits, and an adapter that peft wrote loads in the
engine with the same logits."""
import json

import pytest
import torch
from peft import PeftModel

from mezo import MeZOConfig, MeZOTrainer
from mezo_fixtures import FEW_SHOT, HEADLINES
from mezo_helpers import base_hf, classification_examples, make_engine, peft_adapter, snapshot, tokenizer

ATOL = 1e-4


def _prompts():
    tok = tokenizer()
    return [tok.encode(FEW_SHOT + f"Headline: {h}\nTopic: sport", add_special_tokens=False) for h in HEADLINES[:3]]


@torch.no_grad()
def _hf_logits(model, prompts):
    return [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_engine_adapter_after_mezo_steps_loads_in_peft(tmp_path):
    engine = make_engine()
    trainer = MeZOTrainer(engine, MeZOConfig(eps=1e-2, lr=1e-2, batch_size=4, seed=2))
    initial = snapshot(engine)
    batch = trainer.encode(classification_examples(FEW_SHOT, [" business", " sport", " tech"]))[:4]
    for _ in range(2):
        assert not trainer.step(batch)["skipped"]
    trained = snapshot(engine)
    for k in trained:  # both factors moved (B started at 0)
        assert not torch.equal(trained[k], initial[k]), k

    engine.save_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    peft_model = PeftModel.from_pretrained(base_hf(), tmp_path / "adapter").eval()
    loaded = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert set(loaded) == set(trained)
    for k, v in loaded.items():
        assert torch.equal(v.detach(), trained[k]), k

    prompts = _prompts()
    ours = engine.prompt_logits(prompts)
    theirs = _hf_logits(peft_model, prompts)
    assert _max_diff(ours, theirs) <= ATOL
    # the adapter matters far more than the tolerance: the base model's logits are elsewhere
    assert _max_diff(ours, _hf_logits(base_hf(), prompts)) > 100 * ATOL

    # and back: a fresh engine loading the file reproduces the trained engine exactly
    other = make_engine()
    other.load_adapter(tmp_path / "adapter")
    for k, v in other.trainable_parameters().items():
        assert torch.equal(v, trained[k]), k
    assert _max_diff(other.prompt_logits(prompts), ours) <= ATOL


PEFT_CONFIGS = [
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]),
    dict(r=2, lora_alpha=3, target_modules=["v_proj", "down_proj"], layers_to_transform=[1]),
]


@pytest.mark.parametrize("cfg", PEFT_CONFIGS, ids=["qv-r8", "all-r4", "layer1-r2"])
def test_peft_written_adapter_loads_in_engine(cfg, tmp_path):
    peft_model = peft_adapter(tmp_path / "peft", **cfg)

    engine = make_engine()
    spec = engine.load_adapter(tmp_path / "peft")
    assert spec.r == cfg["r"] and spec.alpha == cfg["lora_alpha"]
    assert set(spec.target_modules) == set(cfg["target_modules"])
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
    assert len(engine.trainable_parameters()) == n_lora

    prompts = _prompts()
    ours = engine.prompt_logits(prompts)
    theirs = _hf_logits(peft_model, prompts)
    assert _max_diff(ours, theirs) <= ATOL
    assert _max_diff(ours, _hf_logits(base_hf(), prompts)) > 100 * ATOL
