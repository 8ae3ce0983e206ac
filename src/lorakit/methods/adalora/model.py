"""`AdaLoraModel`: the ``base_model`` of a `PeftModel` holding AdaLoRA adapters (PEFT's layout).

It adds two things to `LoraModel`: ``forward`` adds ``orth_reg_weight * R(A, B)`` to
``outputs.loss`` when the model computed a loss (labels given), and ``update_and_allocate(step)``
runs the rank allocator. A training loop calls it after each optimizer step, before zero_grad:

    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(step)
    optimizer.zero_grad()

A loop that computes its own loss adds `orthogonal_loss()` to it instead. lorakit's trainer calls
the hooks every `LoraModel` has: `auxiliary_loss` (the regulariser) and `after_optimizer_step`
(the allocation).
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.model import LoraModel
from lorakit.methods.adalora.allocator import RankAllocator
from lorakit.methods.adalora.regularizer import orthogonal_regularizer

__all__ = ["AdaLoraModel"]


class AdaLoraModel(LoraModel):
    """Holds the user's model with `SVDLinear` layers; one AdaLoRA adapter trains at a time."""

    def __init__(self, model):
        super().__init__(model)
        self._allocator: RankAllocator | None = None

    @property
    def trainable_adapter_name(self) -> str | None:
        """The adapter not in inference mode (PEFT allows one), or None."""
        names = [n for n, c in self.peft_config.items() if not c.inference_mode]
        return names[0] if names else None

    @property
    def rankallocator(self) -> RankAllocator:
        name = self.trainable_adapter_name
        if name is None:
            raise LorakitError("no AdaLoRA adapter is trainable (all are in inference mode); load it with "
                               "is_trainable=True to train and reallocate its ranks")
        if self._allocator is None or self._allocator.adapter_name != name:
            self._allocator = RankAllocator(self.model, self.peft_config[name], name)
        return self._allocator

    def check_new_adapter(self, config) -> None:
        super().check_new_adapter(config)
        if not config.inference_mode and self.trainable_adapter_name is not None:
            raise ConfigError(
                f"AdaLoRA trains one adapter at a time and {self.trainable_adapter_name!r} is trainable; "
                "add the new one with inference_mode=True")

    def orthogonal_loss(self) -> torch.Tensor:
        """``orth_reg_weight * R(A, B)`` of the trainable adapter (0 when none trains)."""
        name = self.trainable_adapter_name
        if name is None:
            return torch.zeros(())
        return self.peft_config[name].orth_reg_weight * orthogonal_regularizer(self.model, name)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The orthogonal regulariser of the trainable adapter (`orthogonal_loss`), once per step;
        None when no adapter trains."""
        return self.orthogonal_loss() if self.trainable_adapter_name is not None else None

    def after_optimizer_step(self, step: int) -> None:
        """Score the triplets on this step's gradients and mask to the step's budget."""
        self.update_and_allocate(step)

    def forward(self, *args, **kwargs):
        """The user's model, plus ``orth_reg_weight * R(A, B)`` on ``outputs.loss`` when there is
        a loss, a trainable adapter and a task_type (PEFT's task models, e.g. CAUSAL_LM, go through
        this forward; its plain PeftModel, task_type None, calls the user's model directly)."""
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = self.trainable_adapter_name
        if isinstance(loss, torch.Tensor) and name is not None and self.peft_config[name].task_type is not None:
            outputs.loss = loss + self.orthogonal_loss()
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Score the triplets from this step's gradients and mask to the step's budget
        (`RankAllocator.update_and_allocate`); the newest mask is kept as the config's
        ``rank_pattern``, which saving uses to store only the kept triplets."""
        allocator = self.rankallocator
        pattern = allocator.update_and_allocate(global_step)
        if pattern:
            allocator.config.rank_pattern = pattern

    def add_weighted_adapter(self, *args, **kwargs):
        raise ConfigError("add_weighted_adapter combines LoRA adapters; AdaLoRA adapters are not supported "
                          "(as in PEFT): merge_and_unload() them instead")
