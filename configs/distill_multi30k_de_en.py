"""A half-width Multi30k de→en student distilled from a trained multi30k_de_en teacher.

  python train.py --config=configs/multi30k_de_en.py --workdir=/tmp/m30k-de-en \
      --config.data_dir=/path/to/multi30k
  python train.py --config=configs/distill_multi30k_de_en.py --workdir=/tmp/m30k-student \
      --config.data_dir=/path/to/multi30k --config.distill.teacher_workdir=/tmp/m30k-de-en

Student: d_model 128, d_ff 512, 3+3 layers, 4 heads; alpha 0.5, temperature 2. Not measured
yet on Multi30k: the measured comparison is on the synthetic task (configs/distill_synthetic.py).
"""

import ml_collections

from configs import multi30k_de_en


def get_config() -> ml_collections.ConfigDict:
    config = multi30k_de_en.get_config()
    config.model.d_model = 128
    config.model.d_ff = 512
    config.distill.teacher_workdir = ""  # required: a trained multi30k_de_en workdir
    config.distill.alpha = 0.5
    config.distill.temperature = 2.0
    return config
