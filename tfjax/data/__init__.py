"""Translation data: TFDS sources, the synthetic task, the tokenizer and grain pipelines."""

from tfjax.data.folder import CorpusError, build_folder, find_splits, read_parallel
from tfjax.data.pipeline import PipelineOptions, eval_dataset, train_batch_shapes, train_dataset
from tfjax.data.sources import (
    SYNTHETIC,
    DatasetNotPreparedError,
    ParallelSource,
    TranslationData,
    prepare,
)
from tfjax.data.synthetic import build_synthetic
from tfjax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    load_or_train_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "SYNTHETIC",
    "UNK_ID",
    "CorpusError",
    "DatasetNotPreparedError",
    "ParallelSource",
    "PipelineOptions",
    "Tokenizer",
    "TranslationData",
    "build_folder",
    "build_synthetic",
    "eval_dataset",
    "find_splits",
    "load_or_train_tokenizer",
    "prepare",
    "read_parallel",
    "train_batch_shapes",
    "train_dataset",
    "train_tokenizer",
]
