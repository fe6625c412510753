"""sd-scripts habit: `python sdxl_train_network.py --pretrained_model_name_or_path sdxl.safetensors ...`.

A shim: `python -m trainer train --sdxl` with the same arguments (sd-scripts' SDXL script = the SD script
plus --sdxl's rules: two text encoders, size conditioning, --cache_text_encoder_outputs)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", "--sdxl", *sys.argv[1:]]))
