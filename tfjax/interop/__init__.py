"""Weight import from other implementations (needs the `interop` extra: torch, transformers)."""

from tfjax.interop.bert import bert_config, from_bert_classifier, from_bert_masked_lm
from tfjax.interop.marian import MarianImport, config_from_marian, from_marian, load_marian

__all__ = [
    "MarianImport",
    "bert_config",
    "config_from_marian",
    "from_bert_classifier",
    "from_bert_masked_lm",
    "from_marian",
    "load_marian",
]
