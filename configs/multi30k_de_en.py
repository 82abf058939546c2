"""A small Transformer on Multi30k German -> English (a folder of train/val/test files).

  python train.py --config=configs/multi30k_de_en.py --workdir=/tmp/m30k-de-en \
      --config.data_dir=/path/to/multi30k

The folder holds train.de/.en, val.de/.en and test_2016_flickr.de/.en. Expected wall-clock and
BLEU on a 2-core CPU: not measured yet for this recipe (about 24k steps of 4k target tokens).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = "folder"
    config.data_dir = ""  # required: the Multi30k folder
    config.source_lang = "de"
    config.target_lang = "en"
    config.vocab_size = 8000
    config.max_source_len = 64
    config.max_target_len = 64
    config.batch_size = 64
    config.model = ml_collections.ConfigDict(
        dict(
            preset="base",
            d_model=256,
            d_ff=1024,
            num_heads=4,
            num_layers=3,
            dropout_rate=0.3,
            max_len=128,
            dtype="float32",
        )
    )
    config.learning_rate = 1e-3
    config.warmup_steps = 4000
    config.num_train_steps = 24000
    config.eval_every = 2000
    config.eval_split = "val"
    config.eval_decode_sentences = 1014
    config.eval_beam_size = 1
    config.test_split = "test_2016_flickr"
    config.checkpoint_every = 1000
    config.keep_checkpoints = 10  # for checkpoint averaging
    return config
