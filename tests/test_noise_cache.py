"""The CPU noise memo: same values as randn, bounded, keeps the first tensors once full, and the
trainer sizes it from the model (MeZO's memory promise) and empties it after each update."""
import pytest
import torch

from kernels import noise_cache
from kernels.noise import randn


pytestmark = pytest.mark.usefixtures("fresh_noise_memo")


def test_memo_returns_randn_and_respects_its_limit():
    noise_cache.set_noise_cache_limit(3 * 100 * 4)  # room for three 100-element tensors
    for seed in range(5):
        assert torch.equal(noise_cache.cached_randn(seed, (10, 10)), randn(seed, (10, 10)))
    assert noise_cache.noise_cache_bytes() == 1200
    # full: the first three stay (a cyclic reader keeps hitting them), the last two are not kept
    kept = {key[0] for key in noise_cache._cache}
    assert kept == {0, 1, 2}
    assert noise_cache.cached_randn(1, (4, 25)).data_ptr() == noise_cache._cache[(1, 100, "cpu")].data_ptr()


def test_zero_limit_disables_and_lowering_the_limit_empties():
    noise_cache.cached_randn(3, (50,))
    assert noise_cache.noise_cache_bytes() == 200
    noise_cache.set_noise_cache_limit(100)
    assert noise_cache.noise_cache_bytes() == 0
    noise_cache.set_noise_cache_limit(0)
    noise_cache.cached_randn(3, (50,))
    assert noise_cache.noise_cache_bytes() == 0
    with pytest.raises(ValueError):
        noise_cache.set_noise_cache_limit(-1)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trainer_bounds_the_memo_and_the_bound_changes_no_number(mode):
    from mezo import MeZOConfig, MeZOTrainer
    from mezo_helpers import classification_examples, make_engine

    engine = make_engine()
    trainer = MeZOTrainer(engine, MeZOConfig(mode=mode, batch_size=2, seed=3))
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    assert trainer.noise_memo_budget() == weights // 20
    assert noise_cache.set_noise_cache_limit(weights // 20) == weights // 20  # set by the trainer
    z_bytes = 4 * sum(p.numel() for p in trainer.params.values())
    batch = classification_examples("", [" sport", " tech"], n=2)
    seed = 12345
    losses = {}
    for limit in (weights // 20, z_bytes // 3, 0):  # all of z (this tiny model), a third, none
        noise_cache.set_noise_cache_limit(limit)
        noise_cache.clear_noise_cache()
        losses[limit] = trainer.branch_losses(batch, seed)
        held = noise_cache.noise_cache_bytes()
        assert held <= limit and (held == z_bytes or limit < z_bytes)
    first = losses[weights // 20]
    assert all(torch.equal(l[0], first[0]) and torch.equal(l[1], first[1]) for l in losses.values())
    noise_cache.set_noise_cache_limit(weights // 20)
    trainer.branch_losses(batch, seed)
    assert noise_cache.noise_cache_bytes() > 0
    trainer.apply_update([seed], torch.zeros(1), 0.0)
    assert noise_cache.noise_cache_bytes() == 0  # z of a finished step is never kept
