"""AdaLoRA (Zhang et al. 2023, https://arxiv.org/abs/2303.10512): SVD-form adapters whose ranks
are reallocated during training by the importance of each singular triplet. PEFT-compatible.
A LoRA method: it registers itself by peft_type "ADALORA" (`ADALORA`, `lorakit.methods`).

    config.py        AdaLoraConfig (peft_type "ADALORA"): the schedule and the final rank_pattern
    layer.py         SVDAdapter (lora_A, lora_E, lora_B, ranknum), SVDLinear, inject_adalora
    allocator.py     RankAllocator: importance EMAs, the cubic budget schedule, masking
    regularizer.py   the orthogonal regulariser on A and B
    model.py         AdaLoraModel: base_model with update_and_allocate and the regularised loss

    config = AdaLoraConfig(init_r=12, target_r=8, total_step=1000, target_modules=["q_proj", "v_proj"])
    model = lorakit.get_peft_model(base, config)       # model.base_model is an AdaLoraModel
"""

from lorakit.plugins import Method, register_method
from lorakit.methods.adalora.allocator import RankAllocator, budget_schedule
from lorakit.methods.adalora.config import AdaLoraConfig
from lorakit.methods.adalora.layer import SVDAdapter, SVDLinear, inject_adalora, svd_layer_tensors
from lorakit.methods.adalora.model import AdaLoraModel
from lorakit.methods.adalora.regularizer import orthogonal_regularizer

__all__ = ["ADALORA", "AdaLoraConfig", "AdaLoraModel", "RankAllocator", "SVDAdapter", "SVDLinear",
           "budget_schedule", "orthogonal_regularizer"]

ADALORA = register_method(Method(
    peft_type=AdaLoraConfig.PEFT_TYPE, name="AdaLoRA", config_class=AdaLoraConfig, inject=inject_adalora,
    model_class=AdaLoraModel, layer_tensors=svd_layer_tensors, mixed_batches=False,
    resume_problem="its rank allocator's importance averages are not checkpointed",
))
"""AdaLoRA's entry in `lorakit.methods` (registered when lorakit is imported)."""
