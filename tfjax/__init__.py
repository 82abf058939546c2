"""tfjax: the Transformer of "Attention Is All You Need" in JAX / Flax Linen; the public API.

Names load on first use, so `import tfjax.model` does not pull in the trainer's data and
checkpoint libraries.
"""

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "Transformer": "tfjax.model",
    "TransformerConfig": "tfjax.model",
    "preset": "tfjax.model",
    "Translator": "tfjax.translator",
    "Translation": "tfjax.translator",
    "train_and_evaluate": "tfjax.trainer",
    "pipeline": "tfjax.pipelines",
    "MaskedLM": "tfjax.model",
    "Classifier": "tfjax.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tfjax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
