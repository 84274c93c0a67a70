"""Train a vcritic critic end to end.

    python jobs/train.py                              # demo preset: local Ray, CPU, sqlite MLflow
    python jobs/train.py joint_text_audio train.use_gpu=true train.num_workers=8
    ray job submit --working-dir . -- python jobs/train.py demo train.epochs=2

The first argument may name a preset under jobs/configs/ (or a .yaml path); every other
argument is a key=value override of the config schema in vcritic/config.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: `ray job submit --working-dir .` ships this tree.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vcritic.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
