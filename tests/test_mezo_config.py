"""MeZOConfig: validation messages, paper presets, lr schedules, (de)serialisation."""
import json
import math

import pytest

from mezo.config import MeZOConfig


def test_default_is_opt_lora_preset():
    assert MeZOConfig() == MeZOConfig.preset("opt-lora")


@pytest.mark.parametrize("name,expect", [
    # MeZO paper Table 16 + large_models/mezo.sh (OPT)
    ("opt-lora", dict(mode="lora", lr=1e-4, eps=1e-2, batch_size=16, steps=20_000, weight_decay=0.0,
                      lora_rank=8, lora_alpha=16, lora_target_modules=("q_proj", "v_proj"), eval_every=4000)),
    ("opt-lora-5e-5", dict(mode="lora", lr=5e-5, eps=1e-2, batch_size=16, steps=20_000)),
    ("opt-full", dict(mode="full", lr=1e-6, eps=1e-3, batch_size=16, steps=20_000, weight_decay=0.0)),
    ("opt-full-1e-7", dict(mode="full", lr=1e-7, eps=1e-3)),
    # Table 15 + medium_models/mezo.sh (RoBERTa-large)
    ("roberta-full", dict(mode="full", lr=1e-6, eps=1e-3, batch_size=64, steps=100_000, eval_every=10_000)),
    ("roberta-full-1e-7", dict(mode="full", lr=1e-7, eps=1e-3, batch_size=64)),
    ("roberta-full-1e-5", dict(mode="full", lr=1e-5, eps=1e-3, batch_size=64)),
    ("roberta-lora", dict(mode="lora", lr=1e-4, eps=1e-3, weight_decay=0.1, batch_size=64, steps=100_000)),
    ("roberta-lora-5e-5", dict(lr=5e-5, eps=1e-3, weight_decay=0.1)),
    ("roberta-lora-1e-5", dict(lr=1e-5, eps=1e-3, weight_decay=0.1)),
])
def test_presets_match_paper(name, expect):
    cfg = MeZOConfig.preset(name)
    for k, v in expect.items():
        assert getattr(cfg, k) == v, (name, k)
    assert cfg.lr_schedule == "constant" and cfg.n_spsa == 1 and cfg.objective == "classification"


def test_presets_listed_and_no_prefix_preset():
    names = MeZOConfig.presets()
    assert "opt-lora" in names and "roberta-full" in names
    assert not any("prefix" in n for n in names)  # no prefix-tuning in this engine
    with pytest.raises(ValueError, match="unknown MeZO preset 'opt-prefix'"):
        MeZOConfig.preset("opt-prefix")


def test_preset_overrides_and_eval_interval():
    cfg = MeZOConfig.preset("opt-lora", steps=100, lr=3e-4)
    assert cfg.lr == 3e-4 and cfg.eval_every == 20 and cfg.checkpoint_every == 20
    assert MeZOConfig.preset("roberta-full", steps=1000).eval_every == 100
    assert MeZOConfig.preset("opt-lora", steps=100, eval_every=7).eval_every == 7
    with pytest.raises(ValueError, match="unknown fields"):
        MeZOConfig.preset("opt-lora", learning_rate=1.0)


@pytest.mark.parametrize("field,value", [
    ("lr", 0.0), ("lr", -1e-4), ("lr", float("nan")), ("eps", 0), ("eps", float("inf")),
    ("steps", 0), ("steps", 2.5), ("steps", True), ("batch_size", 0), ("n_spsa", 0),
    ("weight_decay", -0.1), ("lr_schedule", "step"), ("mode", "prefix"), ("lora_rank", 0),
    ("lora_alpha", 0), ("lora_target_modules", "q_proj"), ("lora_target_modules", ()),
    ("lora_target_modules", ("q_proj", "q_proj")), ("lora_layers", ()), ("lora_layers", (-1,)),
    ("lora_layers", (0, 0)), ("objective", "rouge"), ("max_length", 0), ("max_new_tokens", -1),
    ("eval_every", 0), ("eval_size", 0), ("checkpoint_dir", ""), ("checkpoint_every", 0),
    ("seed", -1), ("max_nonfinite", 0), ("dtype", "float64"),
])
def test_invalid_field_names_field_and_value(field, value):
    with pytest.raises(ValueError) as e:
        MeZOConfig(**{field: value})
    assert f"MeZOConfig.{field}=" in str(e.value) and repr(value)[:8] in str(e.value)


def test_generation_objective_needs_new_tokens():
    with pytest.raises(ValueError, match="max_new_tokens"):
        MeZOConfig(objective="f1", max_new_tokens=0)
    assert MeZOConfig(objective="lm", max_new_tokens=0).max_new_tokens == 0


def test_lists_become_tuples():
    cfg = MeZOConfig(lora_target_modules=["q_proj", "k_proj"], lora_layers=[0, 3])
    assert cfg.lora_target_modules == ("q_proj", "k_proj") and cfg.lora_layers == (0, 3)


def test_lr_schedules():
    const = MeZOConfig(lr=1e-3, steps=100)
    assert const.lr_at(0) == const.lr_at(99) == 1e-3
    lin = MeZOConfig(lr=1e-3, steps=100, lr_schedule="linear")
    assert lin.lr_at(0) == 1e-3 and math.isclose(lin.lr_at(50), 5e-4) and lin.lr_at(100) == 0.0
    assert lin.lr_at(1000) == 0.0  # clamped past the end
    cos = MeZOConfig(lr=1e-3, steps=100, lr_schedule="cosine")
    assert cos.lr_at(0) == 1e-3 and math.isclose(cos.lr_at(50), 5e-4) and cos.lr_at(100) < 1e-18
    assert cos.lr_at(25) > lin.lr_at(25)
    with pytest.raises(ValueError, match="step=-1"):
        const.lr_at(-1)


def test_dict_round_trip_through_json():
    cfg = MeZOConfig.preset("roberta-lora", lora_layers=(1, 2), checkpoint_dir="/tmp/x", seed=7)
    back = MeZOConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        MeZOConfig.from_dict({**cfg.to_dict(), "bogus": 1})
