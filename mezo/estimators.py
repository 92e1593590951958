"""Zeroth-order gradient estimators over one batched launch of several perturbations (issue 14).

A step draws n perturbations z_1..z_n (sample seeds, mezo/seeds.py). Every estimator runs all of its
branches — a branch is (perturbation id, sign σ) over the whole batch — as ONE set of engine requests,
so each weight is read once per launch, and turns the branch losses into update coefficients c_k for
p ← p − lr·(Σ_k c_k z_k + wd·p) (`MeZOTrainer.apply_update`, z_k regenerated from its seed).

- ``"spsa"``: MeZO (Malladi et al. 2023, arXiv 2305.17333), n-SPSA: branches (k, +1), (k, −1);
  g_k = (L(θ+εz_k) − L(θ−εz_k)) / (2ε) / n.
- ``"one_sided"``: the batched one-sided estimate of FZOO (Dang et al. 2025, arXiv 2506.09034):
  branches (k, +1) for every k plus ONE unperturbed copy (id 0, σ = 0);
  g_k = (L(θ+εz_k) − L(θ)) / ε / n. With ``one_sided_std_scaling`` the coefficients are divided by
  FZOO's σ_t, the standard deviation of the n perturbed losses L(θ+εz_k) (population std,
  divisor n), floored at ``one_sided_std_floor`` so equal losses never divide by zero.

- ``"per_example"``: GRZO (Tan et al. 2026, "GRZO: Group-Relative Zeroth-Order Optimization for Large
  Language Model Fine-Tuning", arXiv 2606.02857): example i of the step's batch of B gets its own
  perturbation z_i (sample seed ``step_seed(run, step, i)``, i its index in the GLOBAL batch); two
  branches σ = ±1, and in branch σ the rows of example i run at θ + σ ε z_i — 2B sequences in one
  launch, as MeZO n = 1, but B directions. δ_i = ℓ_i(θ+εz_i) − ℓ_i(θ−εz_i) (per-example losses);
  g_i = δ_i/(2ε). GRZO (``per_example_group_relative``): a_i = δ_i / (s + ϵ), s the population std of
  δ over the batch (divisor B), ϵ = ``one_sided_std_floor``; a_i is not mean-centred; c_i = a_i/(2εB).
  Without it c_i = δ_i/(2εB) (plain per-example SPSA: the unbiased average of the B estimates).
  KV is namespaced per (seed_i, σ): examples no longer share prompt KV with each other (a few-shot
  prompt is computed once per example and branch), only an example's own candidates share it.

``normalize_perturbations`` (MeZO's default is off) perturbs by ε·z_k/‖z_k‖ (‖·‖ over all trainable
tensors): the launch runs with ε_k = ε/‖z_k‖ and the update regenerates z_k, so c_k = g_k/‖z_k‖.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.forward_batch import PerturbationTable
from engine.radix_cache import common_prefix_len

from .config import ESTIMATORS


@dataclass(frozen=True)
class LaunchPlan:
    """The branches of one step's launch: (perturbation id, sign) each, grouped by id (dense tiles)."""

    table: PerturbationTable
    branches: tuple[tuple[int, float], ...]
    # per_example (GRZO): example i of the batch runs under perturbation id i in every branch (the
    # branch's own id is unused); its losses come back per example, not as a batch mean
    per_example: bool = False

    def perturbation_id(self, branch: int, example: int) -> int:
        """The perturbation id of global example `example` in `branch`."""
        return example if self.per_example else self.branches[branch][0]

    def namespace(self, branch: int, example: int = 0) -> tuple:
        """KV namespace of (branch, global example): KV is shared within a perturbed copy, never
        across copies (per_example: every example is a copy of its own)."""
        pid, sign = self.perturbation_id(branch, example), self.branches[branch][1]
        return ("mezo", self.table.seeds[pid], sign)


def check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")


def launch_plan(estimator: str, seeds: list[int], eps: float, norms: list[float] | None = None) -> LaunchPlan:
    """The branches `estimator` runs for the step's sample seeds. ``norms`` (‖z_k‖, normalized
    perturbations) scale each perturbation's ε to ε/‖z_k‖. ValueError for an unknown estimator."""
    check_estimator(estimator)
    eps_k = tuple(float(eps) / n for n in norms) if norms is not None else (float(eps),) * len(seeds)
    table = PerturbationTable(tuple(int(s) for s in seeds), eps_k)
    if estimator == "spsa":
        branches = tuple((k, s) for k in range(len(seeds)) for s in (1.0, -1.0))
    elif estimator == "per_example":  # seeds[i] is example i's; every example runs in both branches
        return LaunchPlan(table, ((0, 1.0), (0, -1.0)), per_example=True)
    else:  # one perturbed copy per k, then the unperturbed copy (σ = 0: no noise, its own namespace)
        branches = tuple((k, 1.0) for k in range(len(seeds))) + ((0, 0.0),)
    return LaunchPlan(table, branches)


@dataclass
class Estimate:
    """Device tensors of one step: projected gradients g [n], update coefficients [n], logged loss []
    (per_example: n = B, one per example)."""

    projected_grad: torch.Tensor
    coefficients: torch.Tensor
    loss: torch.Tensor


# GRZO divides by the spread s of the δ_i, which vanishes when every example moves the same way (all
# δ_i equal: a 0/±1 accuracy or F1 loss flipping together, or a tiny batch), and then a_i = δ_i/ϵ is an
# enormous step. s is therefore held at >= this fraction of rms(δ) (so |a_i| <= √B / fraction). With
# independent z_i, mean(δ) is about rms(δ)/√B, so the bound binds only when |mean δ| > 0.995 rms(δ):
# never in an ordinary step. A safeguard of this project, not part of the paper.
GROUP_SPREAD_MIN_FRACTION = 0.1


def group_spread(delta: torch.Tensor) -> torch.Tensor:
    """GRZO's s for the per-example differences δ [B] (float64): the population std of δ, held at >=
    GROUP_SPREAD_MIN_FRACTION · rms(δ) (see there). 0 only when every δ_i is 0."""
    rms = delta.square().mean().sqrt()
    return torch.maximum(delta.std(correction=0), GROUP_SPREAD_MIN_FRACTION * rms)


def estimate(estimator: str, branch_losses: torch.Tensor, n: int, eps: float, norms: torch.Tensor | None = None,
             std_scaling: bool = False, std_floor: float = 1e-6, group_relative: bool = True) -> Estimate:
    """g, update coefficients and the logged loss from the plan's branch losses ([len(branches)] fp32,
    in `launch_plan` order; per_example: [2, B] per-example losses, row 0 at +εz_i, row 1 at −εz_i,
    n = B), all on the device (no host sync). Logged loss: the mean of the 2n SPSA losses (2B for
    per_example), or L(θ) for one_sided. ``norms`` float64 [n] or None. ``std_scaling`` (one_sided)
    and ``group_relative`` (per_example) use ``std_floor``."""
    check_estimator(estimator)
    if estimator == "per_example":
        if branch_losses.shape != (2, n):
            raise ValueError(f"per_example needs [2, {n}] per-example losses, got {tuple(branch_losses.shape)}")
        delta = branch_losses[0].double() - branch_losses[1].double()
        g = (delta / (2 * eps)).float()
        loss = branch_losses.mean()
        if group_relative:  # GRZO: a_i = δ_i / (s + ϵ), s the population std of δ (not mean-centred)
            delta = delta / (group_spread(delta) + std_floor)
        coeffs = (delta / (2 * eps * n)).float()
    elif estimator == "spsa":
        pm = branch_losses.reshape(n, 2)
        g = (pm[:, 0] - pm[:, 1]) / (2 * eps) / n  # n-SPSA averages the n estimates
        loss = pm.mean()
        coeffs = g
    else:
        perturbed, base = branch_losses[:n], branch_losses[n]
        g = (perturbed - base) / eps / n
        loss = base
        coeffs = g
        if std_scaling:
            sigma = perturbed.double().std(correction=0).clamp_min(std_floor)
            coeffs = (g.double() / sigma).float()
    if norms is not None:
        coeffs = (coeffs.double() / norms.to(coeffs.device)).float()
    return Estimate(g, coeffs, loss)


def trie_tokens(sequences: list[list[int]]) -> int:
    """Tokens of the prefix tree of `sequences` (shared prefixes counted once): Σ lengths minus the
    common prefixes of neighbours in sorted order."""
    seqs = sorted(sequences)
    total = sum(len(s) for s in seqs)
    for a, b in zip(seqs, seqs[1:]):
        total -= common_prefix_len(a, b)
    return total


def branch_kv_pages(reqs: list, page_size: int) -> int:
    """Pages the requests of one branch hold at once, counted the way the pool allocates them: each
    request takes ceil(max_total_tokens / page_size) pages (its last page partly filled), less the
    whole pages of prompt it can share with its neighbour in sorted order. The cache shares full pages
    only (a partly matched page is copied into a fresh one), and a request matches at most the
    scheduler's limit (never its last prompt token, nor a scoring request's tokens from score_from on);
    the smaller of the two neighbours' limits is used, so the count errs on the large side."""
    def limit(r) -> int:
        lim = len(r.prompt_ids) - 1
        return max(min(lim, r.score_from - 1) if r.score_from is not None else lim, 0)

    reqs = sorted(reqs, key=lambda r: r.prompt_ids)
    pages = sum(-(-max(r.max_total_tokens(), len(r.prompt_ids)) // page_size) for r in reqs)
    for a, b in zip(reqs, reqs[1:]):
        pages -= min(common_prefix_len(a.prompt_ids, b.prompt_ids), limit(a), limit(b)) // page_size
    return pages


def check_kv_budget(engine, per_branch: list[list[list]], config, per_example: bool = False) -> None:
    """ValueError when the KV of every branch of a launch cannot be held at once: branches ×
    `branch_kv_pages` (whole pages, generation adding max_new_tokens per request) against the pool's
    usable pages, the error naming both. Only with the prefix cache on (without it the scheduler runs
    the requests in turns). ``per_example``: every example of a branch is its own KV namespace, so a
    branch needs the sum of its examples' pages (nothing shared across examples)."""
    if not engine.cache.enabled or not per_branch:
        return
    page_size = engine.pool.page_size
    if per_example:
        per = sum(branch_kv_pages(group, page_size) for group in per_branch[0])
    else:
        per = branch_kv_pages([r for group in per_branch[0] for r in group], page_size)
    need = per * len(per_branch)
    usable = engine.pool.num_usable_pages
    if need > usable:
        shared = "no prefix shared across examples" if per_example else "prefix + suffixes"
        advice = ("lower batch_size or raise the engine's max_cache_tokens, or use estimator='spsa' (examples "
                  "then share their prompt's KV)" if per_example else
                  "lower n_spsa or batch_size, or raise the engine's max_cache_tokens")
        raise ValueError(
            f"one MeZO step needs {need} pages of KV ({len(per_branch)} branches x {per} pages of {page_size} "
            f"tokens: {shared}; estimator={config.estimator!r}, n_spsa={config.n_spsa}) but the KV pool "
            f"holds {usable} pages ({usable * page_size} tokens); {advice}")
