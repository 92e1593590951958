"""Issue 12 item 4: PEFT adapter_config.json fields that change the function (rank_pattern,
alpha_pattern, use_rslora, target regexes, layers_pattern, exclude_modules, ...) are honoured on
load and save, exactly as peft.PeftModel applies them, or refused by name."""
import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel

from engine.peft_config import pattern_key, target_matches
from mezo_helpers import base_hf, make_engine, peft_adapter, tokenizer

ATOL = 1e-4


def _prompts():
    tok = tokenizer()
    return [tok.encode(t, add_special_tokens=False) for t in ("Headline: Striker scores twice\nTopic:",
                                                              "The bank raised rates again today")]


@torch.no_grad()
def _hf_logits(model, prompts):
    return [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))




CONFIGS = {
    # the input: v_proj at r=4, alpha=32 (scale 8), q_proj at r=8, alpha=16 (scale 2)
    "rank-alpha-pattern": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                               rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 32}),
    "layer-pattern-keys": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "down_proj": 6},
                               alpha_pattern={r"model\.layers\.0\..*": 3}),
    "rslora": dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], use_rslora=True),
    "regex-targets": dict(r=3, lora_alpha=5, target_modules=r".*\.1\.mlp\.(up|gate)_proj"),
    "layers-pattern": dict(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"], layers_to_transform=[0],
                           layers_pattern="layers"),
    "exclude": dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                    exclude_modules=["model.layers.0.self_attn.v_proj"]),
    "all-linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_adapter_loads_and_saves_at_peft_scale(name, tmp_path):
    peft_model = peft_adapter(tmp_path / "peft", **CONFIGS[name])
    engine = make_engine()
    engine.load_adapter(tmp_path / "peft")
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
    assert len(engine.trainable_parameters()) == n_lora
    prompts = _prompts()
    ours, theirs = engine.prompt_logits(prompts), _hf_logits(peft_model, prompts)
    assert _max_diff(ours, theirs) <= ATOL
    assert _max_diff(ours, _hf_logits(base_hf(), prompts)) > 100 * ATOL

    # and saved back by the engine, peft reads the same per-module ranks and scales
    engine.save_adapter(tmp_path / "ours")
    again = PeftModel.from_pretrained(base_hf(), tmp_path / "ours").eval()
    assert _max_diff(_hf_logits(again, prompts), theirs) <= ATOL
    other = make_engine()
    other.load_adapter(tmp_path / "ours")
    assert _max_diff(other.prompt_logits(prompts), ours) <= ATOL


def test_add_lora_with_patterns_saves_what_peft_would_build(tmp_path):
    engine = make_engine()
    engine.add_lora(8, 16, ("q_proj", "v_proj"), rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 32}, seed=1)
    params = engine.trainable_parameters()
    assert params["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape[0] == 4
    assert params["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 8
    g = torch.Generator().manual_seed(3)
    engine.set_trainable({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in params.items()})
    engine.save_adapter(tmp_path / "a")
    peft_model = PeftModel.from_pretrained(base_hf(), tmp_path / "a").eval()
    prompts = _prompts()
    assert _max_diff(engine.prompt_logits(prompts), _hf_logits(peft_model, prompts)) <= ATOL


def test_pattern_rules_match_peft():
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    names = [f"model.layers.{i}.{m}" for i in (0, 1, 10) for m in
             ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")]
    patterns = ["v_proj", r"layers\.1\..*", "proj", r"mlp\.(up|down)_proj", "q_proj$"]
    for n in names:
        want = get_pattern_key(patterns, n)
        assert pattern_key(patterns, n) == (None if want == n else want), n
    for cfg in CONFIGS.values():
        c = LoraConfig(**cfg)
        for n in names:
            want = bool(check_target_module_exists(c, n)) and type(check_target_module_exists(c, n)).__name__ != "_ExcludedModule"
            if c.target_modules == "all-linear" or cfg.get("target_modules") == "all-linear":
                continue  # peft expands "all-linear" while it wraps the model
            got = target_matches(n, c.target_modules if isinstance(c.target_modules, str) else list(c.target_modules),
                                 c.layers_to_transform, [c.layers_pattern] if isinstance(c.layers_pattern, str)
                                 else c.layers_pattern, c.exclude_modules)
            assert got == want, (cfg, n)


REFUSED = [("use_dora", True), ("bias", "all"), ("bias", "lora_only"), ("lora_bias", True),
           ("modules_to_save", ["lm_head"]), ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"),
           ("layer_replication", [[0, 2]]), ("trainable_token_indices", [1, 2]), ("future_field", 3)]


@pytest.mark.parametrize("field,value", REFUSED, ids=[f"{f}={v}" for f, v in REFUSED])
def test_fields_that_change_the_function_are_refused_by_name(field, value, tmp_path):
    peft_adapter(tmp_path / "peft", r=2, lora_alpha=4, target_modules=["q_proj"])
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    engine = make_engine()
    with pytest.raises(ValueError, match=field):
        engine.load_adapter(tmp_path / "peft")
    assert engine.lora_spec is None and not engine.trainable_parameters()


def test_harmless_fields_are_accepted(tmp_path):
    peft_adapter(tmp_path / "peft", r=2, lora_alpha=4, target_modules=["q_proj"])
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(fan_in_fan_out=True, lora_dropout=0.3, init_lora_weights="gaussian", inference_mode=False)
    cfg_path.write_text(json.dumps(cfg))
    make_engine().load_adapter(tmp_path / "peft")


def test_config_and_weights_must_cover_the_same_modules(tmp_path):
    peft_adapter(tmp_path / "peft", r=2, lora_alpha=4, target_modules=["q_proj"])
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "k_proj"]  # peft would add k_proj LoRA with its init, not the file's
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="k_proj"):
        make_engine().load_adapter(tmp_path / "peft")
    cfg["target_modules"], cfg["layers_to_transform"] = ["q_proj"], [0]  # weights for layer 1 would be ignored
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layers.1"):
        make_engine().load_adapter(tmp_path / "peft")


def test_rank_that_disagrees_with_the_config_is_refused(tmp_path):
    peft_adapter(tmp_path / "peft", r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {}  # the file's v_proj has rank 2, the config now says 4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rank"):
        make_engine().load_adapter(tmp_path / "peft")


def test_config_edited_or_torn_from_its_weights_is_detected(tmp_path):
    engine = make_engine()
    engine.add_lora(2, 4, ("q_proj",))
    engine.save_adapter(tmp_path / "a")
    engine.save_adapter(tmp_path / "b")
    engine.add_lora(2, 8, ("q_proj",))  # same shapes, another scale
    engine.save_adapter(tmp_path / "b")
    # a crash between the two renames of a save: new weights, old config
    shutil.copy(tmp_path / "a" / "adapter_config.json", tmp_path / "b" / "adapter_config.json")
    with pytest.raises(ValueError, match="lora_alpha"):
        make_engine().load_adapter(tmp_path / "b")


def test_torn_weights_file_is_a_clear_error(tmp_path):
    engine = make_engine()
    engine.add_lora(2, 4, ("q_proj",))
    engine.save_adapter(tmp_path / "a")
    w = tmp_path / "a" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ValueError, match="torn"):
        make_engine().load_adapter(tmp_path / "a")


def test_missing_lora_alpha_means_peft_default_8(tmp_path):
    peft_model = peft_adapter(tmp_path / "peft", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["lora_alpha"]  # LoraConfig's default is 8 (the engine used alpha = r before: scale 1, not 2)
    cfg_path.write_text(json.dumps(cfg))
    engine = make_engine()
    engine.load_adapter(tmp_path / "peft")
    prompts = _prompts()
    assert _max_diff(engine.prompt_logits(prompts), _hf_logits(peft_model, prompts)) <= ATOL
