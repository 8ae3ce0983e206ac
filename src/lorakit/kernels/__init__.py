"""The fast paths under lorakit's layers and trainer, in plain PyTorch: each one computes what a
short reference formula says, as few autograd nodes as possible, and takes whatever state it
needs from its caller or from the object that owns it (no module-global switch or cache).

- `fused`: a LoRA linear layer's ``base(x) + s * B A x`` as one autograd node.
- `batching`: mixed-adapter batches' math, every row through its own adapter's slot of a stack
  (stacking the adapters and choosing the rows' slots is `lorakit.batching`).
- `attention`: causal attention as one node; a one-row stream of examples laid out per example.
- `norms`: RMSNorm as one node.
- `loss`: cross-entropy through the output head on the label positions only, chunk by chunk.
- `precision`: whether a device multiplies bf16 natively (every ``precision: auto``).

The bottom of the core: these modules import torch (and `lorakit.errors`) only, never the layers
that call them; hooking a kernel into a transformers model is `lorakit.models`' job. Nothing is imported here, so that
``from lorakit.kernels import fused`` loads only what it names.
"""
