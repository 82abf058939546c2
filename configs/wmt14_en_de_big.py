"""The paper's big model on WMT14 English -> German (TFDS), for TPU or GPU.

  python train.py --config=configs/wmt14_en_de_big.py --workdir=gs://BUCKET/wmt14-big \
      --config.data_dir=gs://BUCKET/tensorflow_datasets

As wmt14_en_de_base.py with d_model 1024, d_ff 4096, 16 heads, dropout 0.3, peak learning
rate (1024 * 4000)^-0.5 = 4.9e-4 and 300k steps. Parameters and optimizer state are sharded
over an fsdp axis. The paper reports 28.4 BLEU on newstest2014; this recipe has not been run
to completion yet. `python -m tfjax precompile --config=configs/wmt14_en_de_big.py
--topology=v5e:2x4 --search_batch` compiles it for a v5e-8: 3.31 GiB of a chip's 16 GB at 12
rows per chip, and at most 67 rows per chip (--config.batch_size=536) fit.
"""

import ml_collections

from configs import wmt14_en_de_base


def get_config() -> ml_collections.ConfigDict:
    config = wmt14_en_de_base.get_config()
    config.model = ml_collections.ConfigDict(dict(preset="big", max_len=256, dtype="bfloat16"))
    config.learning_rate = 4.9e-4
    config.num_train_steps = 300_000
    config.mesh = (1, -1, 1)  # fsdp over every device
    return config
