"""Run by tests/test_train_distributed.py under `python -m torch.distributed.run --nproc_per_node 2`:
trains through the real build/loop code and writes what this process saw and holds to <out>/rank<N>.json."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config.args import parse_train_args  # noqa: E402
from trainer.train.build import prepare_training  # noqa: E402
from trainer.train.events import Reporter  # noqa: E402
from trainer.train.loop import train  # noqa: E402

out = Path(sys.argv[1])
setup = prepare_training(parse_train_args(sys.argv[2:]), Reporter())
setup.dataset.set_epoch(1)
seen = [path for batch in setup.dataloader for path in batch["image_paths"]]
train(setup, Reporter())
weights = {k: v.float().flatten().tolist() for k, v in setup.network.state_dict().items()}
rank = setup.accelerator.process_index
(out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "weights": weights}), encoding="utf-8")
