"""sd-scripts' `--network_module` plugin namespace: `networks.lora` is trainer's LoRA."""
