"""A small encoder-only Transformer classifying ChnSentiCorp review sentiment (Chinese).

  python train.py --config=configs/chnsenticorp.py --workdir=/tmp/chnsenticorp \
      --config.data_dir=/path/to/chnsenticorp

The folder holds train.tsv, dev.tsv and test.tsv (`label<TAB>sentence`, 1 = positive).
Its dev and test share rows with train: `benchmarks/encoder_quality.py --unseen` reports test
accuracy on all rows and on the rows not in train. Results: README "Results".
"""

import ml_collections

from configs import sst2


def get_config() -> ml_collections.ConfigDict:
    config = sst2.get_config()
    config.max_source_len = 256  # reviews run long; the rest is cut, with a count logged
    config.batch_size = 32
    config.num_train_steps = 1200  # 4 epochs of 9,600 reviews
    config.warmup_steps = 300
    config.eval_every = 300
    config.checkpoint_every = 300
    config.model.max_len = 256
    config.test_split = "test"
    return config
