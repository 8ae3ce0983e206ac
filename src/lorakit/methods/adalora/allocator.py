"""AdaLoRA's rank allocator: importance of each singular triplet, a falling budget, masking.

Zhang et al. 2023 (https://arxiv.org/abs/2303.10512), section 3.2 and 3.3, as PEFT computes it:

    I(w)      = |w * dL/dw|                                   sensitivity of one entry
    Ibar_t    = beta1 * Ibar_{t-1} + (1 - beta1) * I_t        smoothed sensitivity
    Ubar_t    = beta2 * Ubar_{t-1} + (1 - beta2) * |I_t - Ibar_t|   its uncertainty
    s(w)      = Ibar_t * Ubar_t                               score of one entry
    S_i       = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)      score of triplet i of one layer

    budget(t) = init_bgt                                           t <= tinit
              = target_bgt + (init_bgt - target_bgt) (1 - (t - tinit) / (T - tfinal - tinit))^3
              = target_bgt                                         t > T - tfinal

where init_bgt = the sum of the layers' ranks, target_bgt = target_r * layers, T = total_step.
Every deltaT steps the (init_bgt - budget) lowest-scoring triplets of all layers together have
their singular value E_i set to 0; at step T - tfinal the final mask (``rank_pattern``) is fixed
and re-applied after every later step.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lorakit.errors import LorakitError
from lorakit.methods.adalora.config import AdaLoraConfig, pattern_for
from lorakit.methods.adalora.layer import svd_adapters

__all__ = ["RankAllocator", "budget_schedule"]

_FACTORS = ("lora_A", "lora_E", "lora_B")


def budget_schedule(step: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    deltaT: int) -> tuple[int, bool]:
    """(the budget of kept triplets at ``step``, whether to mask at this step): the cubic schedule."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (remaining ** 3) + target_bgt), step % deltaT == 0


class RankAllocator:
    """Importance scores and masks for the trainable AdaLoRA adapter of ``model``.

    ``model`` is the user's model with `SVDLinear` layers in it; the scores are kept per layer
    name and factor (``lora_A`` / ``lora_E`` / ``lora_B``)."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str):
        self.model, self.config, self.adapter_name = model, config, adapter_name
        self.layers = dict(svd_adapters(model, adapter_name))
        self.init_bgt = sum(a.lora_A.shape[0] for a in self.layers.values())
        self.target_bgt = config.target_r * len(self.layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        return budget_schedule(step, init_bgt=self.init_bgt, target_bgt=self.target_bgt, tinit=c.tinit,
                               tfinal=c.tfinal, total_step=c.total_step, deltaT=c.deltaT)

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Fold this step's sensitivities |p * grad| into the two moving averages."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for name, adapter in self.layers.items():
            for factor in _FACTORS:
                p = getattr(adapter, factor)
                if p.grad is None:
                    raise LorakitError(
                        f"update_and_allocate: {name}.{factor} has no gradient; call it after "
                        "loss.backward() (and optimizer.step()) and before optimizer.zero_grad()")
                key = (name, factor)
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                self.ipt[key] = (p * p.grad).abs().detach()
                self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * self.ipt[key]
                self.exp_avg_unc[key] = (beta2 * self.exp_avg_unc[key]
                                         + (1 - beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs())

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i of every triplet, per layer: (r,)."""
        scores = {}
        for name in self.layers:
            s = {f: self.exp_avg_ipt[(name, f)] * self.exp_avg_unc[(name, f)] for f in _FACTORS}
            a = s["lora_A"].mean(dim=1, keepdim=True)  # (r, 1)
            b = s["lora_B"].mean(dim=0).view(-1, 1)  # (r, 1)
            scores[name] = s["lora_E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1)  # (r,)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E of the (init_bgt - budget) lowest-scoring triplets; returns the rank_pattern."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item() if k > 0 else -float("inf")
        pattern = {}
        for name, adapter in self.layers.items():
            dropped = scores[name] <= threshold  # (r,)
            adapter.lora_E.masked_fill_(dropped.view(-1, 1), 0.0)
            pattern[f"{name}.lora_E"] = (~dropped).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, rank_pattern: dict) -> None:
        """Re-apply a fixed pattern: E of every dropped triplet back to 0."""
        for name, adapter in self.layers.items():
            kept = pattern_for(rank_pattern, name)
            if kept is not None:
                keep = torch.tensor(kept, dtype=torch.bool, device=adapter.lora_E.device)
                adapter.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, global_step: int) -> dict | None:
        """One step of the schedule (PEFT's phases); returns a new rank_pattern, or None.

        Before T - tfinal: update the scores and mask to the budget every deltaT steps; at
        T - tfinal: the final mask, then the scores are dropped; after: re-apply the final mask."""
        c = self.config
        final = c.total_step - c.tfinal
        if global_step < final:
            self.update_ipt()
            budget, mask_now = self.budget_schedule(global_step)
            return self.mask_to_budget(budget) if mask_now else None
        if global_step == final:
            if not self.exp_avg_ipt:  # no earlier step was scored (PEFT fails here): score this one
                self.update_ipt()
            budget, _ = self.budget_schedule(global_step)
            pattern = self.mask_to_budget(budget)
            self.reset_ipt()
            return pattern
        if c.rank_pattern:
            self.mask_using_rank_pattern(c.rank_pattern)
        return None
