"""The paper's base model on WMT14 English -> German (TFDS), for TPU or GPU.

  python train.py --config=configs/wmt14_en_de_base.py --workdir=gs://BUCKET/wmt14-base \
      --config.data_dir=gs://BUCKET/tensorflow_datasets

The dataset must be prepared as array_record first (see README, Data). Hyperparameters of
"Attention Is All You Need", section 5: N=6, d_model 512, d_ff 2048, 8 heads, dropout 0.1,
label smoothing 0.1, Adam(0.9, 0.98, 1e-9), 4,000 warmup steps, peak learning rate
(512 * 4000)^-0.5 = 7.0e-4, 100k steps of about 25k target tokens (here 96 packed rows of 256).
The paper reports 27.3 BLEU on newstest2014; this recipe has not been run to completion yet.
Before a launch, `python -m tfjax precompile --config=configs/wmt14_en_de_base.py
--topology=v5e:2x4` (README, "Before a TPU launch"): 2.16 GiB per chip of a v5e's 16 GB.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = "wmt14_translate/de-en"
    config.data_dir = ""  # TFDS data dir holding the prepared dataset ("" = TFDS's default)
    config.source_lang = "en"
    config.target_lang = "de"
    config.vocab_size = 32000
    config.max_source_len = 256
    config.max_target_len = 256
    config.batch_size = 96
    config.model = ml_collections.ConfigDict(dict(preset="base", max_len=256, dtype="bfloat16"))
    config.learning_rate = 7e-4
    config.warmup_steps = 4000
    config.label_smoothing = 0.1
    config.clip_norm = 0.0  # the paper does not clip
    config.num_train_steps = 100_000
    config.log_every = 100
    config.eval_every = 5000
    config.eval_split = "validation"
    config.eval_decode_sentences = 3000
    config.eval_batch_size = 64
    config.eval_beam_size = 4
    config.eval_alpha = 0.6
    config.test_split = "test"
    config.checkpoint_every = 2000
    config.keep_checkpoints = 5
    return config
