"""sd-scripts habit: `python train_network.py --pretrained_model_name_or_path ... --network_module networks.lora`.

A shim: everything happens in `python -m trainer train`, which takes the same arguments."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
