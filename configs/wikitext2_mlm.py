"""Masked-LM pretraining of the encoder that configs/sst2.py classifies with.

  python train.py --config=configs/wikitext2_mlm.py --workdir=/tmp/wikitext2-mlm \
      --config.data_dir=/path/to/mlm-folder

The folder holds train.txt and test.txt, one text per line (blank lines skipped). Results
in README "Results" come from train.txt = WikiText-2 valid + the English and German sides
of Multi30k train + the SST-2 train sentences without labels, and test.txt = WikiText-2 test
(the README shows the commands that assemble it).
"""

import ml_collections

from configs import sst2


def get_config() -> ml_collections.ConfigDict:
    config = sst2.get_config()
    config.task = "masked_lm"
    config.label_names = ()
    config.max_source_len = 128  # long paragraphs are cut to their first 128 pieces
    config.pack = True  # short sentences share rows
    config.batch_size = 32
    config.learning_rate = 1e-3
    config.warmup_steps = 1000
    config.num_train_steps = 2000
    config.eval_every = 1000
    config.eval_split = "test"  # no WikiText-2 train here: valid is training text
    config.test_split = "test"
    config.checkpoint_every = 1000
    return config
