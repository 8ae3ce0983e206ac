"""LoRA methods, each a plug-in that registers itself by ``peft_type`` in `lorakit.plugins`:

    lora.py        LORA: LoraConfig, `LoraLayer` adapters, LoraModel
    adalora/       ADALORA: AdaLoraConfig, SVD-form layers, AdaLoraModel (rank allocation)

A method module builds one `lorakit.plugins.Method` and calls `register_method` when it is
imported; ``lorakit``'s ``__init__`` imports every method module, so importing lorakit registers
them all. Nothing in the core imports this package. A new method is one module (or package)
here plus its import in ``lorakit/__init__.py``.
"""
