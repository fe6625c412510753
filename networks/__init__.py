"""sd-scripts' `--network_module` plugin namespace: `networks.lora`, `networks.loha` and `networks.lokr` are
trainer's LoRA, LoHa and LoKr."""
