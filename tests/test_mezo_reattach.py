"""Issue 12 item 8: a second finetune() whose LoRA settings differ from the engine's adapter raises
(naming the setting) instead of training the old adapter under a config it never used."""
import pytest
import torch

from mezo import MeZOConfig, MeZOTrainer
from mezo_helpers import classification_examples, make_engine, snapshot

TRAIN = classification_examples("", [" sport", " tech"], n=2)


def _cfg(**kw):
    return MeZOConfig(steps=1, batch_size=2, lr=1e-2, eps=1e-2, **kw)


@pytest.mark.parametrize("second,field", [
    (dict(lora_rank=4), "lora_rank"),
    (dict(lora_alpha=32), "lora_alpha"),
    (dict(lora_target_modules=("q_proj", "k_proj", "v_proj")), "lora_target_modules"),
    (dict(lora_layers=(1,)), "lora_layers"),
])
def test_second_finetune_with_other_lora_settings_raises(second, field):
    engine = make_engine()
    engine.finetune(TRAIN, config=_cfg(), progress=False)
    trained = snapshot(engine)
    with pytest.raises(ValueError, match=field):
        engine.finetune(TRAIN, config=_cfg(**second), progress=False)
    after = snapshot(engine)  # the adapter is untouched
    assert set(after) == set(trained) and all(torch.equal(after[k], trained[k]) for k in after)


def test_second_finetune_with_the_same_settings_continues_the_adapter():
    engine = make_engine()
    engine.finetune(TRAIN, config=_cfg(), progress=False)
    first = snapshot(engine)
    engine.finetune(TRAIN, config=_cfg(seed=1), progress=False)
    second = snapshot(engine)
    assert set(first) == set(second)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_remove_adapter_then_new_settings_trains_a_new_adapter():
    engine = make_engine()
    engine.finetune(TRAIN, config=_cfg(), progress=False)
    engine.remove_adapter()
    engine.finetune(TRAIN, config=_cfg(lora_rank=4), progress=False)
    ranks = {v.shape[0] for k, v in engine.trainable_parameters().items() if "lora_A" in k}
    assert ranks == {4} and engine.lora_spec.r == 4


def test_full_mode_does_not_drop_a_lora_adapter_and_vice_versa():
    engine = make_engine()
    engine.add_lora()
    with pytest.raises(ValueError, match="mode='full'"):
        MeZOTrainer(engine, _cfg(mode="full"))
    assert engine.lora_spec is not None
    full = make_engine()
    full.enable_full_finetuning()
    with pytest.raises(ValueError, match="mode='lora'"):
        MeZOTrainer(full, _cfg())


def test_loaded_adapter_with_per_module_ranks_is_not_mistaken_for_the_config():
    engine = make_engine()
    engine.add_lora(8, 16, ("q_proj", "v_proj"), rank_pattern={"v_proj": 4})
    with pytest.raises(ValueError, match="lora_rank"):
        MeZOTrainer(engine, _cfg())
