"""trainer: LoRA training for Stable Diffusion, a drop-in for kohya-ss sd-scripts' train_network.py.

Importing this package must stay cheap: `python -m trainer setup` runs before torch is installed,
so no module imported at package level may import torch, diffusers or transformers.
"""

__version__ = "0.1.0"
