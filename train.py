"""Train a tfjax Transformer: python train.py --config=configs/default.py --workdir=DIR.

Any config key can be overridden, e.g. --config.num_train_steps=100 --config.model.d_model=256.
A workdir with checkpoints is resumed from its latest one.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tfjax import checkpoint, trainer

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizer and logs (or gs://).")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    checkpoint.quiet_library_logs()
    logging.info("JAX devices: %s", jax.devices())
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
