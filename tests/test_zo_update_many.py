"""zo_update_many_: the whole adapter's update in a few flat ops, bit-identical to zo_update_ref_ per tensor."""
import pytest
import torch

from kernels import derive_seed
from kernels import zo_update as zo
from kernels.zo_update import zo_update_many_, zo_update_ref_


def _tensors():
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 31), (31, 8), (0, 4), (5,), (zo._GROUP_ELEMS + 3,), (3, 7), (7, 3)]  # one over a group
    ps = [torch.randn(s, generator=gen) for s in shapes]
    ps.append(torch.randn(6, 4, generator=gen).t())  # non-contiguous: updated on its own
    ps[0][0, 0] = -0.0  # the sign of a zero survives as in the reference
    return ps


@pytest.mark.usefixtures("fresh_noise_memo")  # the memo is emptied even when an assertion fails
@pytest.mark.parametrize("n_seeds,wd", [(1, 0.0), (3, 0.1), (0, 0.05)])
def test_many_is_the_per_tensor_reference_bit_for_bit(n_seeds, wd, monkeypatch):
    monkeypatch.setattr(zo, "_GROUP_ELEMS", 300)  # several flat groups among these small tensors
    ps = _tensors()
    seeds = [[derive_seed(s, i) for s in range(n_seeds)] for i in range(len(ps))]
    grads = torch.randn(n_seeds, generator=torch.Generator().manual_seed(1))
    want = [p.clone() for p in ps]
    for p, s in zip(want, seeds):
        zo_update_ref_(p, s, grads, 1e-2, wd)
    done = []
    got = [p.clone() for p in ps]
    zo_update_many_(got, seeds, grads, 1e-2, wd, impl="torch", on_done=done.append)
    for w, g in zip(want, got):
        assert torch.equal(w.view(torch.int32), g.view(torch.int32))  # every bit, signed zeros too
    assert done == sorted(done) and done[-1] == len(ps) and len(done) < len(ps)  # groups reported in order


def test_many_bad_input():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="seed lists"):
        zo_update_many_(p, [], torch.ones(1), 0.1)
    with pytest.raises(ValueError, match=r"needs 1 seeds .*seeds\[1\] has 2"):
        zo_update_many_(p + [torch.zeros(2)], [[1], [1, 2]], torch.ones(1), 0.1)
    with pytest.raises(TypeError, match="float32"):
        zo_update_many_([torch.zeros(3, dtype=torch.float64)], [[1]], torch.ones(1), 0.1)
    with pytest.raises(ValueError, match="impl"):
        zo_update_many_(p, [[1]], torch.ones(1), 0.1, impl="cuda")
    assert torch.equal(p[0], torch.zeros(3))
