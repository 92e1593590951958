"""MeZO on the engine: both perturbed branches in one batched run, the update in one kernel pass."""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Sequence

import torch

from engine import Engine
from engine.adapters import LoraSpec, lora_modules
from engine.forward_batch import PerturbationTable
from kernels import derive_seed, randn, zo_update_many_
from kernels.noise_cache import clear_noise_cache, prefetch_step_noise, set_noise_cache_limit
from kernels.noise_norm import perturbation_norms

from .config import MAX_PER_EXAMPLE_BATCH, MeZOConfig
from .data import ClassificationExample, LMExample, load_examples
from .estimators import LaunchPlan, check_kv_budget, estimate, launch_plan
from .seeds import step_seed  # noqa: F401  (re-exported: mezo.trainer.step_seed)
from .objectives import (EncodedExample, encode, example_loss, generation_metric, generation_request,
                         scoring_requests, summarize)

Example = ClassificationExample | LMExample


class NonFiniteLossError(RuntimeError):
    pass


def attach_trainable(engine: Engine, config: MeZOConfig) -> None:
    """Give the engine the trainable tensors ``config`` asks for, or keep the ones it has when they
    are exactly those; never silently train something else.

    - mode "lora", engine without an adapter: attach a fresh one (PEFT init, A seeded by config.seed).
    - mode "lora", engine with an adapter: it is trained further if every adapted module, its rank and
      its scale are what (lora_rank, lora_alpha, lora_target_modules, lora_layers) give; otherwise
      ValueError naming the differing settings (a second ``finetune()`` with other LoRA settings
      raises rather than training the old adapter or dropping it; call ``engine.remove_adapter()``
      to start a new one, or pass the adapter's settings to continue it).
    - mode "full": the engine must carry no LoRA adapter (ValueError: it would be dropped).
    - an engine in full-parameter mode refuses mode "lora" likewise (its trained weights would be frozen).
    """
    if config.mode == "full":
        if engine.lora_spec is not None:
            raise ValueError("MeZOConfig.mode='full' but the engine carries a LoRA adapter "
                             f"({engine.lora_spec}); full-parameter training would drop it: save it and call "
                             "engine.remove_adapter() first")
        if not engine.full_finetuning:
            engine.enable_full_finetuning()
        return
    if engine.full_finetuning:
        raise ValueError("MeZOConfig.mode='lora' but the engine is in full-parameter mode (its weights are "
                         "being trained); call engine.remove_adapter() first to freeze them and add LoRA")
    wanted = LoraSpec(config.lora_rank, float(config.lora_alpha), tuple(config.lora_target_modules),
                      config.lora_layers)
    if engine.lora_spec is None:
        engine.add_lora(wanted.r, wanted.alpha, wanted.target_modules, wanted.layers, seed=config.seed)
        return
    wanted.validate(engine.spec.num_layers)
    have, want = lora_modules(engine.model), wanted.module_shapes(engine.model)
    if have != want:
        spec = engine.lora_spec
        diffs = [f"{field}: adapter {a!r}, config {b!r}" for field, a, b in (
            ("lora_rank", sorted({r for r, _ in have.values()}), sorted({r for r, _ in want.values()})),
            ("lora_alpha (as scale alpha/r)", sorted({s for _, s in have.values()}), sorted({s for _, s in want.values()})),
            ("lora_target_modules", spec.target_modules, wanted.target_modules),
            ("lora_layers", spec.layers, wanted.layers)) if a != b]
        moved = sorted(set(have) ^ set(want))
        raise ValueError("the engine already carries a LoRA adapter that differs from MeZOConfig's LoRA settings ("
                         + "; ".join(diffs or [f"modules {moved[:4]}"]) + "). Call engine.remove_adapter() to train "
                         "a new adapter, or set the config to the adapter's settings to continue training it")


class MeZOTrainer:
    """Zeroth-order training of the engine's trainable tensors (LoRA by default).

    A step draws n sample seeds and runs every branch its estimator needs (n-SPSA: ±εz_k for each
    k; one_sided: +εz_k for each k and the unperturbed model; per_example: ±εz_i for example i of
    the batch, B seeds) as ONE set of engine requests
    (per-sequence perturbation id and sign; within a branch the examples share their common prompt
    KV through the radix cache, namespaced by (seed, sign); per_example's examples share nothing, each
    running under its own z_i), forms the estimate on the device
    (mezo/estimators.py) and applies p ← p − lr·(Σ_k c_k z_k + wd·p) with the in-place kernel that
    regenerates z.
    """

    def __init__(self, engine: Engine, config: MeZOConfig | None = None):
        self.engine = engine
        self.config = config = config or MeZOConfig()
        if engine.tokenizer is None:
            raise ValueError("MeZO needs an engine with a tokenizer")
        attach_trainable(engine, config)
        self.params = engine.trainable_parameters()
        set_noise_cache_limit(self.noise_memo_budget())
        self.step_count = 0
        self.nonfinite_steps = 0
        self._consecutive_nonfinite = 0
        self._torn_update: str | None = None  # set when an update raised part-way (weights half-updated)

    # -- noise ------------------------------------------------------------------------------
    def noise_memo_budget(self) -> int:
        """Bytes the CPU path may keep of a step's z between its launches and the update: a twentieth
        of the weights' bytes, or all of the step's z (n_spsa float32 copies of the trainable tensors;
        batch_size of them for per_example) when that is at most a tenth of them — so LoRA keeps every
        perturbation's z at any n_spsa a step can hold, while full-parameter mode keeps part and
        regenerates the rest and the step stays near the memory of inference (MeZO's point)."""
        weights = sum(p.numel() * p.element_size() for p in self.engine.model.parameters())
        cfg = self.config
        perturbations = cfg.batch_size if cfg.estimator == "per_example" else cfg.n_spsa
        step_z = perturbations * 4 * sum(p.numel() for p in self.params.values())
        return max(weights // 20, step_z if step_z <= weights // 10 else 0)

    def noise(self, seed: int) -> dict[str, torch.Tensor]:
        """z of every trainable tensor for `seed`, materialized (tests and debugging only)."""
        return {name: randn(derive_seed(seed, i), tuple(t.shape), device=t.device)
                for i, (name, t) in enumerate(self.params.items())}

    # -- losses -----------------------------------------------------------------------------
    def encode(self, examples: Sequence[Example]) -> list[EncodedExample]:
        # the checks finetune's input gets (`step` may be handed raw examples): a clear ValueError
        # here instead of an IndexError, or a silently misaligned loss, mid-step
        examples = load_examples(list(examples), self.config.objective)
        encoded = [encode(self.engine, ex) for ex in examples]
        context = self.engine.spec.max_position_embeddings
        for i, ex in enumerate(encoded):
            if not ex.prompt:
                raise ValueError(f"example {i}: the prompt encodes to no tokens")
            length = len(ex.prompt) + max(len(c) for c in (ex.candidates or [ex.target or []]))
            if length > self.config.max_length:
                raise ValueError(f"example {i} has {length} tokens, more than max_length={self.config.max_length}")
            if length > context:
                raise ValueError(f"example {i} has {length} tokens, more than the model's context ({context})")
        return encoded

    def branch_losses(self, examples: Sequence[Example] | list[EncodedExample], seed: int,
                      eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-mean losses at θ+εz and θ−εz (0-d fp32 tensors) of one perturbation, from one run of
        both branches."""
        eps = self.config.eps if eps is None else eps
        plan = LaunchPlan(PerturbationTable((seed,), (float(eps),)), ((0, 1.0), (0, -1.0)))
        losses = self.launch_losses(self._encoded(examples), plan)
        return losses[0], losses[1]

    def launch_losses(self, encoded: list[EncodedExample], plan: LaunchPlan) -> torch.Tensor:
        """Batch-mean loss of every branch of `plan` (fp32 [len(plan.branches)], on the device), all
        branches in ONE run of requests; for a per_example plan the per-example losses instead (fp32
        [len(plan.branches), len(encoded)]). The hook that data-parallel training
        (mezo/distributed.py) overrides. The prefix cache is reset afterwards: KV under perturbed
        weights is never reused."""
        try:
            # run_requests aborts its requests and resets the perturbation itself if it raises
            per_branch = self.run_plan(encoded, plan)
            if plan.per_example:
                return torch.stack([self.example_losses(encoded, reqs).float() for reqs in per_branch])
            return torch.stack([self._batch_loss(encoded, reqs) for reqs in per_branch])
        except BaseException:
            clear_noise_cache()  # nothing of the failed step (its z) outlives it
            raise
        finally:
            self.engine.cache.reset()  # failed step or not

    def plan_requests(self, encoded: list[EncodedExample], plan: LaunchPlan,
                      indices: Sequence[int] | None = None) -> list[list[list]]:
        """Per branch, per example, the requests of `encoded` under that branch (sign, perturbation id
        and namespace), branches in plan order (grouped by perturbation id). ``indices``: the global
        batch index of each of `encoded` (a data-parallel shard; None: 0, 1, ...), which names its
        per_example perturbation. ValueError for indices of another length."""
        indices = range(len(encoded)) if indices is None else list(indices)
        if len(indices) != len(encoded):
            raise ValueError(f"plan_requests: {len(indices)} indices for {len(encoded)} examples")
        out = []
        for b, (_, sign) in enumerate(plan.branches):
            groups = []
            for i, ex in zip(indices, encoded):
                namespace = plan.namespace(b, i)
                if self.config.objective in ("accuracy", "f1"):
                    group = [generation_request(self.engine, ex, sign, namespace, self.config.max_new_tokens)]
                else:
                    group = scoring_requests(self.engine, ex, sign, namespace)
                for req in group:
                    req.perturbation_id = plan.perturbation_id(b, i)
                groups.append(group)
            out.append(groups)
        return out

    def run_plan(self, encoded: list[EncodedExample], plan: LaunchPlan,
                 indices: Sequence[int] | None = None) -> list[list[list]]:
        """Run every branch of `plan` over `encoded` as one set of requests (one launch per prefix
        depth); returns `plan_requests`' groups, finished. ValueError (before anything runs) when the
        branches' KV does not fit the pool. The caller resets the cache afterwards. ``indices`` as in
        `plan_requests`."""
        per_branch = self.plan_requests(encoded, plan, indices)
        check_kv_budget(self.engine, per_branch, self.config, plan.per_example)
        if plan.per_example:  # rows grouped by perturbation id (example i's + and − rows together): denser tiles
            reqs = [r for j in range(len(encoded)) for groups in per_branch for r in groups[j]]
        else:
            reqs = [r for groups in per_branch for g in groups for r in g]
        self.engine.run_requests(reqs, perturbation=plan.table)
        return per_branch

    def _encoded(self, examples) -> list[EncodedExample]:
        if examples and isinstance(examples[0], EncodedExample):
            return list(examples)
        return self.encode(examples)

    def example_losses(self, encoded: list[EncodedExample], reqs: list[list]) -> torch.Tensor:
        """Per-example losses [len(encoded)]: fp32, or float64 (−accuracy/−F1 of the stop-trimmed
        generation) for the generation objectives, which average in float64."""
        objective = self.config.objective
        if objective in ("accuracy", "f1"):
            return torch.tensor([-generation_metric(objective, r[0].text, ex.target_text)
                                 for ex, r in zip(encoded, reqs)], dtype=torch.float64)
        return torch.stack([example_loss(ex, r) for ex, r in zip(encoded, reqs)]).float()

    def _batch_loss(self, encoded: list[EncodedExample], reqs: list[list]) -> torch.Tensor:
        """The batch mean of `example_losses` as a 0-d fp32 tensor."""
        losses = self.example_losses(encoded, reqs)
        if losses.dtype == torch.float64:
            return (losses.sum() / losses.numel()).float()
        return losses.mean()

    # -- one step -----------------------------------------------------------------------------
    def perturbation_norms(self, seeds: Sequence[int]) -> torch.Tensor:
        """float64 [len(seeds)] on the engine's device: ‖z_k‖ over all trainable tensors, by one extra
        pass of the generator (kernels.noise_norm; the engine's kernels switch picks the path)."""
        numels = [p.numel() for p in self.params.values()]
        tensor_seeds = [[derive_seed(s, j) for j in range(len(numels))] for s in seeds]
        return perturbation_norms(tensor_seeds, numels, device=self.engine.device, impl=self.engine.kernels)

    def step(self, examples: Sequence[Example] | list[EncodedExample]) -> dict[str, Any]:
        """One MeZO step on a batch with ``config.estimator``; returns the step's log record.

        The record holds what replays the step (`mezo.finetune.replay_trajectory`): the sample
        seeds, the update ``coefficients`` given to `apply_update`, the ``estimator``, the per-branch
        losses (launch order: spsa (k, +), (k, −) for each k; one_sided (k, +) for each k, then the
        unperturbed copy; per_example: ℓ_i(θ+εz_i) for every example i, then ℓ_i(θ−εz_i)) and, when
        normalized, ``norms`` (‖z_k‖). per_example: one seed per example of the batch,
        ``projected_grad`` the per-example δ_i/(2ε). ValueError for a per_example batch of more than
        1024 examples, or of fewer than 2 with group-relative scaling.
        """
        cfg = self.config
        if self._torn_update is not None:
            raise RuntimeError(self._torn_update)
        encoded = self._encoded(examples)
        tokens_before = self.engine.runner.tokens_computed
        n = self.perturbation_count(len(encoded))
        seeds = [step_seed(cfg.seed, self.step_count, k) for k in range(n)]
        if self.engine.kernels == "torch":  # the torch path reads z from the memo: fill it in one batched pass
            prefetch_step_noise(seeds, list(self.params.values()))
        norms = norm_values = None
        if cfg.normalize_perturbations:  # (the torch path's norms read the memo just filled)
            norms = self.perturbation_norms(seeds)
            norm_values = norms.tolist()  # the launch takes ε/‖z_k‖ as scalars: a second host read
        plan = launch_plan(cfg.estimator, seeds, cfg.eps, norm_values)
        losses = self.launch_losses(encoded, plan)
        est = estimate(cfg.estimator, losses, n, cfg.eps, norms, cfg.one_sided_std_scaling,
                       cfg.one_sided_std_floor, cfg.per_example_group_relative)
        lr = cfg.lr_at(self.step_count)
        # the step's one host sync: the logged loss, projected gradients, coefficients and losses together
        values = torch.cat([est.loss.reshape(1).float(), est.projected_grad.float(), est.coefficients.float(),
                            losses.float().reshape(-1)]).tolist()
        loss_value, g_values, coeffs, branch_values = values[0], values[1:1 + n], values[1 + n:1 + 2 * n], values[1 + 2 * n:]
        finite = all(math.isfinite(v) for v in (loss_value, *g_values, *coeffs))
        record = {"step": self.step_count, "seeds": seeds, "projected_grad": g_values, "lr": lr,
                  "loss": loss_value, "skipped": not finite,
                  "tokens_computed": self.engine.runner.tokens_computed - tokens_before,
                  "estimator": cfg.estimator, "coefficients": coeffs, "branch_losses": branch_values,
                  "norms": norm_values}
        if finite:
            self.apply_update(seeds, est.coefficients, lr)
            self._consecutive_nonfinite = 0
        else:
            clear_noise_cache()  # the skipped step's z is never used again either
            self.nonfinite_steps += 1
            self._consecutive_nonfinite += 1
            if self._consecutive_nonfinite >= cfg.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self._consecutive_nonfinite} consecutive non-finite losses (last at step {self.step_count}); "
                    f"lower lr ({cfg.lr}) or eps ({cfg.eps})")
        self.step_count += 1
        return record

    def perturbation_count(self, batch: int) -> int:
        """Perturbations of a step on `batch` examples: n_spsa, or one per example for per_example
        (ValueError when the batch breaks the config's per_example limits)."""
        cfg = self.config
        if cfg.estimator != "per_example":
            return cfg.n_spsa
        if batch > MAX_PER_EXAMPLE_BATCH or (cfg.per_example_group_relative and batch < 2):
            low = 2 if cfg.per_example_group_relative else 1
            raise ValueError(f"estimator='per_example' needs a batch of {low}..{MAX_PER_EXAMPLE_BATCH} examples "
                             f"(one perturbation each{', GRZO std over the batch' if low == 2 else ''}), got {batch}")
        return batch

    def apply_update(self, seeds: Sequence[int], grads: torch.Tensor, lr: float,
                     tensor_seed: Callable[[int, int], int] = derive_seed) -> None:
        """p ← p − lr·(Σ_k g_k z_k + wd·p) for every trainable tensor, z regenerated in the kernel.

        ``seeds`` are the step's sample seeds (one per SPSA sample); ``tensor_seed`` maps (sample
        seed, tensor index) to the tensor's Philox seed: `derive_seed`, or a legacy map on replay.
        If it raises part-way (an interrupt, OOM), the tensors before the failing one are updated and
        the rest are not: the trainer then refuses further steps (RuntimeError) instead of training
        on from weights no trajectory describes; reload the last checkpoint to go on.
        """
        done = 0

        def updated(n: int) -> None:  # zo_update_many_ reports: the first n tensors are updated
            nonlocal done
            done = n

        try:
            tensors = list(self.params.values())
            zo_update_many_(tensors, [[tensor_seed(s, i) for s in seeds] for i in range(len(tensors))], grads, lr,
                            self.config.weight_decay, impl=self.engine.kernels, on_done=updated)
        except BaseException:
            self._torn_update = (f"the update of step {self.step_count} was interrupted after {done} of "
                                 f"{len(self.params)} tensors: the weights are half-updated; reload the last "
                                 f"checkpoint (finetune resumes from it) instead of training on")
            raise
        finally:
            clear_noise_cache()  # this step's z is never used again (the next step has new seeds)
            self.engine.weights_changed()  # even a partial update changed the weights: no stale KV

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, examples: Sequence[Example] | list[EncodedExample]) -> dict[str, Any]:
        """Unperturbed metrics: loss and accuracy (classification), loss (LM), accuracy/F1 (generation)."""
        encoded = self._encoded(examples)
        namespace = self.engine.namespace
        if self.config.objective in ("accuracy", "f1"):
            reqs = [[generation_request(self.engine, ex, 0.0, namespace, self.config.max_new_tokens)]
                    for ex in encoded]
        else:
            reqs = [scoring_requests(self.engine, ex, 0.0, namespace) for ex in encoded]
        self.engine.run_requests([r for group in reqs for r in group])
        return summarize(self.config.objective, encoded, reqs, self.engine)


def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def sample_batch(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the step's batch: always exactly ``batch_size`` of them.

    The epoch orders are shuffles derived from (seed, epoch), so resuming at any step sees exactly
    the batches an uninterrupted run would. With ``num_examples >= batch_size`` an epoch is
    ``num_examples // batch_size`` disjoint batches (the remainder waits for a later epoch's order,
    as a drop-last loader does). With fewer examples than one batch, batches are consecutive
    windows of the endless stream order_0 + order_1 + ... (so each example appears about B/N times
    in a batch, and equally often over the run). Raises ValueError for num_examples < 1, batch_size < 1 or step < 0.
    """
    for name, value, low in (("num_examples", num_examples, 1), ("batch_size", batch_size, 1), ("step", step, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"sample_batch: {name}={value!r} must be an int >= {low}")
    if num_examples >= batch_size:
        epoch, slot = divmod(step, num_examples // batch_size)
        return _epoch_order(num_examples, seed, epoch)[slot * batch_size:(slot + 1) * batch_size]
    start = step * batch_size  # position in the stream of concatenated epoch orders
    idx: list[int] = []
    epoch, pos = divmod(start, num_examples)
    while len(idx) < batch_size:
        take = _epoch_order(num_examples, seed, epoch)[pos:pos + batch_size - len(idx)]
        idx += take
        epoch, pos = epoch + 1, 0
    return idx
