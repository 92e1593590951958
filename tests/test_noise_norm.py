"""‖z_p‖ over all trainable tensors (kernels.noise_norm, issue 14 normalize_perturbations): the torch
path equals the norm of the materialized noise, and the Triton kernel (interpreter) equals the torch
path within 1e-6 relative."""
from __future__ import annotations

import pytest
import torch

from kernels import randn
from kernels.noise_norm import perturbation_norms

# a tensor spanning two interpreter chunks (16384 counters), one under a block, an empty one, one of
# a single element; 64-bit seeds next to small ones
NUMELS = [300, 20000, 0, 1, 5000]
SEEDS = [[1, 2**62 + 5, 3, 4, 5], [11, 12, 13, 2**40 + 14, 15], [2**63 - 1, 22, 23, 24, 25]]


def test_torch_path_is_the_norm_of_the_concatenated_noise():
    got = perturbation_norms(SEEDS, NUMELS, impl="torch")
    assert got.dtype == torch.float64 and got.shape == (3,)
    for p, row in enumerate(SEEDS):
        z = torch.cat([randn(s, (n,)).double() for s, n in zip(row, NUMELS)])
        torch.testing.assert_close(got[p], z.norm(), rtol=1e-12, atol=0)


def test_triton_matches_torch(kernel_device):
    ref = perturbation_norms(SEEDS, NUMELS, impl="torch")
    got = perturbation_norms(SEEDS, NUMELS, device=kernel_device, impl="triton")
    assert got.dtype == torch.float64 and got.device.type == torch.device(kernel_device).type
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-6, atol=0)
    # the seeds matter: another seed for one tensor of perturbation 1 changes that norm only
    seeds = [list(r) for r in SEEDS]
    seeds[1][1] += 1
    moved = perturbation_norms(seeds, NUMELS, device=kernel_device, impl="triton").cpu()
    assert torch.equal(moved[[0, 2]], got.cpu()[[0, 2]]) and abs(moved[1] - got[1].cpu()) > 1e-6 * got[1].cpu()


def test_empty_and_bad_inputs():
    assert perturbation_norms([], NUMELS, impl="triton").shape == (0,)
    assert torch.equal(perturbation_norms([[1, 2]], [0, 0], impl="triton"), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="tensor_seeds\\[0\\]"):
        perturbation_norms([[1, 2]], [3], impl="triton")
    with pytest.raises(ValueError, match="negative"):
        perturbation_norms([[1]], [-3], impl="torch")
    with pytest.raises(ValueError, match="2\\^31"):
        perturbation_norms([[1]], [2**31], impl="triton")
    with pytest.raises(ValueError, match="impl"):
        perturbation_norms([[1]], [3], impl="cuda")
