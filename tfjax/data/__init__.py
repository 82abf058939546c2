"""Data: TFDS sources (translation, task folders, the synthetic task), tokenizer, grain."""

from tfjax.data.folder import CorpusError, build_folder, find_splits, read_parallel
from tfjax.data.jsonl_folder import build_jsonl_folder, read_jsonl
from tfjax.data.packing import PipelineStateError
from tfjax.data.pipeline import (
    PipelineOptions,
    eval_dataset,
    tokenized_train_split,
    train_batch_shapes,
    train_dataset,
)
from tfjax.data.sources import (
    SYNTHETIC,
    DatasetNotPreparedError,
    ParallelSource,
    TranslationData,
    prepare,
)
from tfjax.data.synthetic import build_synthetic
from tfjax.data.task_folders import TaskData, TaskSource, prepare_task
from tfjax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    MASK_PIECE,
    NORMALIZATIONS,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    load_or_train_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "MASK_PIECE",
    "NORMALIZATIONS",
    "PAD_ID",
    "SYNTHETIC",
    "TaskData",
    "TaskSource",
    "UNK_ID",
    "CorpusError",
    "DatasetNotPreparedError",
    "ParallelSource",
    "PipelineStateError",
    "PipelineOptions",
    "Tokenizer",
    "TranslationData",
    "build_folder",
    "build_jsonl_folder",
    "build_synthetic",
    "eval_dataset",
    "find_splits",
    "load_or_train_tokenizer",
    "prepare",
    "prepare_task",
    "read_jsonl",
    "read_parallel",
    "tokenized_train_split",
    "train_batch_shapes",
    "train_dataset",
    "train_tokenizer",
]
