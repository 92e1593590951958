"""The batched noise pass (kernels.noise.randn_segments) and the step prefetch (kernels.noise_cache):
bit-identical to the per-tensor randn(derive_seed(seed, index), shape) of the noise contract, the
memo's bound kept, and a MeZO step that reads every z from the prefetched memo."""
import math

import pytest
import torch

from kernels import noise, noise_cache
from kernels.noise import derive_seed, randn, randn_segments

# odd shapes: empty, one element, straddling the 65536-element chunk, LoRA-like, > 65536 elements
SHAPES = [(8, 31), (0,), (1,), (3, 0, 5), (70001,), (65536,), (576, 8), (7, 13, 3), (65535,), (2,)]
SEEDS = [derive_seed(99, i) for i in range(len(SHAPES) - 3)] + [2**63 - 1, 2**32 + 5, -3]  # hi key words


pytestmark = pytest.mark.usefixtures("fresh_noise_memo")


def _segments_equal_randn(seeds, shapes) -> None:
    numels = [math.prod(s) for s in shapes]
    flat = randn_segments(seeds, numels)
    assert flat.dtype == torch.float32 and flat.shape == (sum(numels),)
    pos = 0
    for seed, shape, n in zip(seeds, shapes, numels):
        assert torch.equal(flat[pos:pos + n].view(shape), randn(seed, shape)), (seed, shape)
        pos += n


def test_segments_are_per_tensor_randn_bit_for_bit():
    _segments_equal_randn(SEEDS, SHAPES)


def test_segments_across_many_chunk_boundaries(monkeypatch):
    """Small chunks: segments start, end and span several chunks inside one pass."""
    monkeypatch.setattr(noise, "_CHUNK", 64)
    shapes = [(5,), (200,), (64,), (0,), (1,), (63,), (129,), (3, 11)]
    _segments_equal_randn([derive_seed(7, i) for i in range(len(shapes))], shapes)


def test_segments_many_tensors_in_one_chunk(monkeypatch):
    """Chunks holding more than _FILL_SEGMENTS tensors spread the keys with repeat_interleave instead
    of per-tensor fills; both give the per-tensor randn bits (small chunks: many chunks of each kind)."""
    monkeypatch.setattr(noise, "_CHUNK", 256)
    shapes = [(1 + i % 5,) for i in range(3 * noise._FILL_SEGMENTS)] + [(700,)] + [(2, 3)] * 100
    _segments_equal_randn([derive_seed(5, i) for i in range(len(shapes))], shapes)


def test_segments_bad_input():
    assert randn_segments([], []).shape == (0,)
    with pytest.raises(ValueError, match="seeds"):
        randn_segments([1, 2], [3])
    with pytest.raises(ValueError, match=r"numels\[1\] = -1"):
        randn_segments([1, 2, 3], [4, -1, -2])


def test_prefetch_fills_the_memo_with_randn_and_keeps_its_bound():
    seeds, numels = [11, 12, 13, 14], [100, 300, 50, 100]
    noise_cache.set_noise_cache_limit(4 * 260)  # room for 100 + 50 + 100 elements, not for the 300
    assert noise_cache.prefetch_noise(seeds, numels) == 4 * 250
    assert noise_cache.noise_cache_bytes() == 4 * 250
    assert {key[0] for key in noise_cache._cache} == {11, 13, 14}  # cached_randn's rule: each kept if it fits
    for seed, n in zip(seeds, numels):
        assert torch.equal(noise_cache.cached_randn(seed, (n,)), randn(seed, n))
    hit = noise_cache._cache[(13, 50, "cpu")]
    assert noise_cache.cached_randn(13, (5, 10)).data_ptr() == hit.data_ptr()
    assert noise_cache.prefetch_noise([11, 13], [100, 50]) == 0  # held already: nothing generated again
    with pytest.raises(ValueError, match="numels"):
        noise_cache.prefetch_noise([1, 2], [3])


def test_step_reads_every_z_from_the_prefetched_memo_and_changes_no_number(monkeypatch):
    """A LoRA step prefetches z of every tensor (one batched pass) and generates none lazily; the
    step's record and the updated weights are those of the lazy per-tensor path."""
    from mezo import MeZOConfig, MeZOTrainer
    from mezo_helpers import classification_examples, make_engine, randomize_lora_b, snapshot

    batch = classification_examples("", [" sport", " tech"], n=2)
    results = []
    for prefetch in (False, True):
        engine = make_engine()
        trainer = MeZOTrainer(engine, MeZOConfig(batch_size=2, seed=5, n_spsa=2, weight_decay=0.1, lr=1e-2))
        randomize_lora_b(engine)
        if prefetch:
            def no_lazy_noise(*args, **kwargs):
                raise AssertionError("z generated lazily although the step prefetched it")
            monkeypatch.setattr(noise_cache, "randn", no_lazy_noise)
        else:
            monkeypatch.setattr("mezo.trainer.prefetch_step_noise", lambda *a, **k: 0)
        record = trainer.step(batch)
        results.append((record, snapshot(engine)))
        monkeypatch.undo()
    (lazy, w_lazy), (fast, w_fast) = results
    assert lazy["projected_grad"] == fast["projected_grad"] and lazy["loss"] == fast["loss"]
    assert w_lazy.keys() == w_fast.keys() and all(torch.equal(w_lazy[k], w_fast[k]) for k in w_lazy)
    assert noise_cache.noise_cache_bytes() == 0  # the update still empties the memo
