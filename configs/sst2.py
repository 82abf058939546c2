"""A small encoder-only Transformer classifying SST-2 sentence sentiment (GLUE's split).

  python train.py --config=configs/sst2.py --workdir=/tmp/sst2 \
      --config.data_dir=/path/to/sst2

The folder holds train.tsv and dev.tsv (`label<TAB>sentence`, 1 = positive); dev is the
reported split. To start from a masked LM pretrained with configs/wikitext2_mlm.py (same
model sizes; its tokenizer is reused): add --config.init_from=/tmp/wikitext2-mlm.
Results: README "Results".
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.task = "classification"
    config.dataset = "folder"
    config.data_dir = ""  # required: the SST-2 folder
    config.label_names = ("negative", "positive")  # labels 0 and 1
    config.vocab_size = 8000
    config.max_source_len = 64  # pieces, bos and eos included; longer sentences are cut
    config.pack = False  # one sentence per row: the classifier pools over it
    config.batch_size = 64
    config.model = ml_collections.ConfigDict(
        dict(
            preset="base",
            d_model=256,
            d_ff=1024,
            num_heads=4,
            num_layers=2,
            dropout_rate=0.1,
            attention_dropout_rate=0.1,
            pooling="mean",
            max_len=128,
            dtype="float32",
        )
    )
    config.learning_rate = 5e-4
    config.warmup_steps = 500
    config.label_smoothing = 0.0
    config.weight_decay = 1e-2
    config.num_train_steps = 1500  # about 1.4 epochs of 67,349 phrases
    config.eval_every = 500
    config.eval_split = "dev"
    config.test_split = "dev"  # GLUE's test labels are not public
    config.eval_batch_size = 128
    config.checkpoint_every = 500
    return config
