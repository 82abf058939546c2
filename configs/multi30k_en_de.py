"""A small Transformer on Multi30k English -> German; see multi30k_de_en.py.

  python train.py --config=configs/multi30k_en_de.py --workdir=/tmp/m30k-en-de \
      --config.data_dir=/path/to/multi30k

Expected wall-clock and BLEU on a 2-core CPU: not measured yet for this recipe.
"""

import ml_collections

from configs import multi30k_de_en


def get_config() -> ml_collections.ConfigDict:
    config = multi30k_de_en.get_config()
    config.source_lang = "en"
    config.target_lang = "de"
    return config
