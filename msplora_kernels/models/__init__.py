"""Models: MSPLoRA layers, their injection into whole models, configs, adapter files, export.

    layer.py        MSPLoraLinear and LoraLevel, the drop-in nn.Linear
    base_layers.py  the base layers it wraps (nn.Linear, transformers' Conv1D)
    config.py       MSPLoraConfig
    targets.py      which layers of a model are adapted, and their places in the pyramid
    inject.py       apply_msplora
    merging.py      merge, unmerge, disable, unload
    counts.py       summary and print_trainable_parameters
    adapter_io.py   save_adapter, load_adapter, load_msplora
    peft_export.py  export_peft
    callbacks.py    transformers.Trainer callbacks
"""
