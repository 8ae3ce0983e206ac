"""LoRA variants, each a small named piece beside the plain adapter.

    dora.py        DoRA: a magnitude vector and a column-norm rule for forward and merge
    inits.py       initialisations by name: "gaussian", "pissa", "pissa_niter_N", "olora"
    loraplus.py    LoRA+: B trains at a higher learning rate than A (an optimizer factory)
    adalora/       AdaLoRA: SVD-form adapters whose ranks are reallocated during training
    weighted.py    add_weighted_adapter: new adapters from weighted combinations of others

rsLoRA is one line of scaling (``alpha / sqrt(r)``) and lives in `lorakit.layer.Adapter`.
"""
