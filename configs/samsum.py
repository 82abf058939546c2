"""A small Transformer summarizing SAMSum messenger dialogues (a folder of JSONL files).

  python train.py --config=configs/samsum.py --workdir=/tmp/samsum \
      --config.data_dir=/path/to/samsum

The folder holds train.jsonl, validation.jsonl and test.jsonl, one {"id", "dialogue",
"summary"} object per line; source_lang and target_lang name the JSON fields read. Dialogues
longer than max_source_len pieces are cut (the count is logged). Evaluation decodes with the
eval_* settings and scores ROUGE; the best checkpoint is kept by the mean of ROUGE-1, -2 and
-L. Results: README "Results".
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.task = "summarization"
    config.dataset = "folder"
    config.data_dir = ""  # required: the SAMSum folder
    config.source_lang = "dialogue"  # the JSON field summarized
    config.target_lang = "summary"  # the JSON field of the reference summary
    config.vocab_size = 8000
    config.max_source_len = 256  # pieces, eos included: 86% of the train dialogues fit
    config.max_target_len = 64  # 96.5% of the train summaries fit
    config.batch_size = 16  # packed rows of 256 source pieces
    config.model = ml_collections.ConfigDict(
        dict(
            preset="base",
            d_model=256,
            d_ff=1024,
            num_heads=4,
            num_layers=3,
            dropout_rate=0.1,
            attention_dropout_rate=0.1,
            max_len=256,
            dtype="float32",
        )
    )
    config.learning_rate = 1e-3
    config.warmup_steps = 1000
    config.num_train_steps = 1200
    config.eval_every = 500
    config.eval_split = "validation"
    config.eval_decode_sentences = 200
    config.eval_batch_size = 32
    config.eval_beam_size = 1
    config.test_split = "test"
    config.checkpoint_every = 500
    return config
