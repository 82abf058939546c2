"""Train a tfjax Transformer: python train.py --config=configs/default.py --workdir=DIR.

Any config key can be overridden, e.g. --config.num_train_steps=100 --config.model.d_model=256.
A workdir with checkpoints is resumed from its latest one. The same command as
`python -m tfjax train`.
"""

import sys

from tfjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
