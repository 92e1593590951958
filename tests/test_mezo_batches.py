"""Issue 12 item 10: a MeZO step always runs exactly `batch_size` examples, whatever the data size."""
from collections import Counter

import pytest

from mezo import MeZOConfig
from mezo.trainer import MeZOTrainer, sample_batch
from mezo_helpers import classification_examples, make_engine


@pytest.mark.parametrize("n,bs", [(3, 16), (1, 4), (5, 5), (7, 3), (16, 16), (10, 4), (15, 16)])
def test_every_batch_has_batch_size_examples(n, bs):
    for step in range(12):
        idx = sample_batch(n, bs, seed=3, step=step)
        assert len(idx) == bs
        assert all(0 <= i < n for i in idx)
        if n < bs:  # the data cycles: a window of the epoch stream holds each example about bs/n times
            counts = [Counter(idx)[i] for i in range(n)]
            assert max(counts) - min(counts) <= 2 and min(counts) >= bs // n - 1
        else:  # no example twice in one batch
            assert len(set(idx)) == bs


def test_small_data_batches_follow_the_epoch_orders():
    """With fewer examples than a batch, consecutive batches tile the stream order_0 + order_1 + ..."""
    n, bs = 3, 16
    stream = [i for step in range(5) for i in sample_batch(n, bs, 0, step)]
    for epoch in range(len(stream) // n):
        chunk = stream[epoch * n:(epoch + 1) * n]
        assert sorted(chunk) == list(range(n))  # each window of n is one whole epoch's permutation


def test_sample_batch_rejects_bad_arguments():
    for kwargs, field in ((dict(num_examples=0), "num_examples"), (dict(batch_size=0), "batch_size"),
                          (dict(step=-1), "step")):
        args = dict(num_examples=4, batch_size=2, seed=0, step=0) | kwargs
        with pytest.raises(ValueError, match=field):
            sample_batch(**args)


def test_finetune_three_examples_batch_16_runs_16(monkeypatch):
    sizes = []
    real_step = MeZOTrainer.step

    def spy(self, examples):
        sizes.append(len(examples))
        return real_step(self, examples)

    monkeypatch.setattr(MeZOTrainer, "step", spy)
    engine = make_engine()
    train = classification_examples("", [" sport", " tech"], n=3)
    engine.finetune(train, config=MeZOConfig(steps=1, batch_size=16, lr=1e-3, eps=1e-2), progress=False)
    assert sizes == [16]
