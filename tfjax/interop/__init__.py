"""Weight import from other implementations (needs the `interop` extra: torch, transformers)."""

from tfjax.interop.marian import MarianImport, config_from_marian, from_marian, load_marian

__all__ = ["MarianImport", "config_from_marian", "from_marian", "load_marian"]
