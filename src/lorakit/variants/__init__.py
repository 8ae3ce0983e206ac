"""LoRA variants: leaves that import the core, each one module plus its registration.

    dora.py        DoRA: a magnitude vector and a column-norm rule for forward and merge
                   (an adapter variant: `lorakit.plugins.register_variant`)
    inits.py       initialisations that read the base weight: "pissa", "pissa_niter_N", "olora"
                   (`lorakit.plugins.register_init`) and the conversion to plain LoRA on save
    loraplus.py    LoRA+: B trains at a higher learning rate than A (an optimizer factory)
    weighted.py    add_weighted_adapter: new adapters from weighted combinations of others
                   (`lorakit.plugins.register_operation`)

The core never imports these modules: it consults `lorakit.plugins`, which each fills when
imported (``lorakit/__init__.py`` imports them all). rsLoRA is one line of scaling
(``alpha / sqrt(r)``) and True / False / "gaussian" inits are `lorakit.layer.Adapter`'s own.
LoRA methods with their own layers and file keys (AdaLoRA) are in `lorakit.methods`.
"""
