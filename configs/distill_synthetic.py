"""A half-width student distilled from a trained default-recipe teacher (synthetic en→de).

  python train.py --config=configs/default.py --workdir=/tmp/teacher
  python train.py --config=configs/distill_synthetic.py --workdir=/tmp/student \
      --config.distill.teacher_workdir=/tmp/teacher

The student (d_model 64, d_ff 256, 2+2 layers) reads the teacher's tokenizer and, in every
step, the teacher's softened distribution (alpha 0.5, temperature 2). Without a teacher the
same recipe trains the student alone, the baseline. Measured against it, by sequence-level
distillation and with scheduled sampling: README "Distillation and scheduled sampling".
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.d_model = 64
    config.model.d_ff = 256
    config.num_train_steps = 300
    config.warmup_steps = 100
    config.distill.teacher_workdir = ""  # a trained default-recipe workdir; "" = no teacher
    config.distill.alpha = 0.5
    config.distill.temperature = 2.0
    return config
