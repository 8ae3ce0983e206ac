"""The LoRA lesson's code runs unchanged with `from peft import` replaced by `from lorakit import`."""

import textwrap

from .tiny import tiny_llama

LESSON = textwrap.dedent('''
    from lorakit import LoraConfig, get_peft_model

    # Pattern 1: Conservative Start
    conservative = LoraConfig(
        r=8,                           # Lower rank
        lora_alpha=8,                  # Equal to rank
        target_modules=["q_proj", "v_proj"],  # Attention only
        lora_dropout=0.05,             # Light regularization
    )

    # Pattern 2: Balanced Default
    balanced = LoraConfig(
        r=16,                          # Standard rank
        lora_alpha=16,                 # Equal to rank
        target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj",
            "gate_proj", "up_proj", "down_proj",
        ],
        lora_dropout=0.0,              # No dropout
    )

    # Pattern 3: Maximum Capacity
    max_capacity = LoraConfig(
        r=64,                          # High rank
        lora_alpha=64,                 # Equal to rank
        target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj",
            "gate_proj", "up_proj", "down_proj",
        ],
        lora_dropout=0.0,
    )

    lora_config = LoraConfig(
        r=16,                          # Rank
        lora_alpha=16,                 # Scaling (alpha = rank recommended)
        lora_dropout=0.0,              # No dropout (Unsloth recommendation)
        target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj",
            "gate_proj", "up_proj", "down_proj",
        ],
        bias="none",                   # Don't train biases
        task_type="CAUSAL_LM",         # For language modeling
    )

    # Apply LoRA to base model
    model = get_peft_model(base_model, lora_config)

    def print_trainable_parameters(model):
        trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        all_params = sum(p.numel() for p in model.parameters())
        print(
            f"trainable params: {trainable_params:,} || "
            f"all params: {all_params:,} || "
            f"trainable%: {100 * trainable_params / all_params:.4f}%"
        )

    print_trainable_parameters(model)
    model.print_trainable_parameters()

    # Save only the adapter (not the full model)
    model.save_pretrained(adapter_dir)

    # Later, load adapter onto any compatible base model
    from lorakit import PeftModel

    base_model = load_base_model()  # Load base model
    model = PeftModel.from_pretrained(base_model, adapter_dir)
''')


def test_lesson_code_runs_unchanged(tmp_path, capsys):
    scope = {"base_model": tiny_llama(), "load_base_model": tiny_llama, "adapter_dir": str(tmp_path / "task-api-adapter")}
    exec(compile(LESSON, "lesson", "exec"), scope)
    lines = capsys.readouterr().out.splitlines()
    # 2 layers x (q 16*(32+32) + k 16*(32+16) + v 16*(32+16) + o 16*(32+32) + 3 MLP x 16*(32+64))
    trainable = 2 * (1024 + 768 + 768 + 1024 + 3 * 1536)
    total = sum(p.numel() for p in tiny_llama().parameters()) + trainable
    assert lines[0] == f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}%"
    assert lines[1] == f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    for name in ("conservative", "balanced", "max_capacity"):
        assert scope[name].r in (8, 16, 64)
    loaded = scope["model"]
    assert (tmp_path / "task-api-adapter" / "adapter_model.safetensors").is_file()
    assert loaded.get_nb_trainable_parameters()[0] == 0 and not loaded.training
