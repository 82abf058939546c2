"""A small Transformer on Tatoeba Chinese -> English (a folder of train/dev/test files).

  python train.py --config=configs/tatoeba_zh_en.py --workdir=/tmp/tatoeba-zh-en \
      --config.data_dir=/path/to/tatoeba-zh-en

The folder holds train.zh/.en, dev.zh/.en and test.zh/.en. Expected wall-clock and BLEU on a
2-core CPU: not measured yet for this recipe.
"""

import ml_collections

from configs import multi30k_de_en


def get_config() -> ml_collections.ConfigDict:
    config = multi30k_de_en.get_config()
    config.source_lang = "zh"
    config.target_lang = "en"
    config.max_source_len = 48
    config.max_target_len = 48
    config.eval_split = "dev"
    config.eval_decode_sentences = 1000
    config.test_split = "test"
    return config
