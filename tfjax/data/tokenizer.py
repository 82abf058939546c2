"""The sentencepiece tokenizer: fixed special ids, training on a split, save and load.

Ids are fixed for every model tfjax trains: pad=0, unk=1, bos=2, eos=3; the pieces start at
4. The vocabulary is joint (source and target sentences train one model) so that source and
target embeddings can be shared.

Round trip: decode(encode(x)) == x for text without unusual whitespace. Normalisation is
"identity" by default (NFKC would turn Chinese full-width punctuation such as "，" into ASCII),
and byte fallback spells characters outside the vocabulary as UTF-8 bytes instead of <unk>.
What does not survive: leading, trailing and repeated spaces are collapsed to one space, as
sentencepiece always does for its "▁" word boundary.

Normalisation "zh_hans" maps Traditional Chinese characters to Simplified ones, character by
character (OpenCC's t2s table, read when the tokenizer is trained), and leaves everything else
as "identity" does. The rules are compiled into the sentencepiece model, so every encode of
that model applies them (training data, evaluation, the translator, the server) and loading it
needs no OpenCC; decode(encode(x)) then gives x in Simplified characters.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging
from etils import epath

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
MASK_PIECE = "<mask>"  # masked-LM tokenizers have it as their first piece (id 4)
NORMALIZATIONS = ("identity", "zh_hans")
# Unicode blocks whose characters OpenCC may map: CJK radicals, unified ideographs with
# extension A, compatibility ideographs, and the supplementary ideographic planes.
_CJK_RANGES = (
    (0x2E80, 0x2FDF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF),
)  # fmt: skip


class Tokenizer:
    """A sentencepiece model with tfjax's fixed special ids; picklable (for grain workers)."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model_proto: bytes):
        self._proto = model_proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:  # sentencepiece's parse failure: bad input, not a bug
            raise ValueError(f"not a sentencepiece model ({len(model_proto)} bytes)") from e
        found = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"sentencepiece model has pad, unk, bos, eos ids {found}; tfjax needs "
                f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)} (train it with train_tokenizer)"
            )

    @classmethod
    def load(cls, path: epath.PathLike) -> Tokenizer:
        """Reads a `.model` file (local path or gs://)."""
        path = epath.Path(path)
        try:
            return cls(path.read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def save(self, path: epath.PathLike) -> None:
        """Writes the `.model` file (local path or gs://), creating its folder."""
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._proto)

    @property
    def model_proto(self) -> bytes:
        """The serialized sentencepiece model, e.g. to store with a checkpoint."""
        return self._proto

    @property
    def mask_id(self) -> int | None:
        """The id of MASK_PIECE, or None for a tokenizer trained without it (translation)."""
        return self.piece_id(MASK_PIECE)

    @property
    def normalization(self) -> str:
        """The NORMALIZATIONS entry this model was trained with, read from its behaviour."""
        return "zh_hans" if self._sp.normalize("國") == self._sp.normalize("国") else "identity"

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included; at most the size asked for at training."""
        return self._sp.vocab_size()

    def encode(self, text: str, *, add_eos: bool = True) -> np.ndarray:
        """Text -> ids [length] int32, ending with eos unless add_eos is False."""
        return np.asarray(self._sp.encode(text, add_eos=add_eos), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str], *, add_eos: bool = True) -> list[np.ndarray]:
        """Many texts at once (faster than one by one) -> a list of ids [length_i] int32."""
        ids = self._sp.encode(list(texts), add_eos=add_eos)
        return [np.asarray(row, dtype=np.int32) for row in ids]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids [length] -> text; stops at the first eos and skips pad and bos."""
        ids = np.asarray(ids, dtype=np.int64).tolist()
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self._sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID)])

    def piece(self, token_id: int) -> str:
        """The piece an id stands for, e.g. "▁Haus" (for inspection and debugging)."""
        return self._sp.id_to_piece(token_id)

    def piece_id(self, piece: str) -> int | None:
        """The id of a piece, e.g. "▁Haus"; None when the vocabulary does not have it."""
        found = self._sp.piece_to_id(piece)
        return None if found == UNK_ID and piece != self._sp.id_to_piece(UNK_ID) else found

    def __getstate__(self) -> bytes:
        return self._proto

    def __setstate__(self, proto: bytes) -> None:
        self.__init__(proto)


def train_tokenizer(
    sentences: Iterable[str],
    *,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    user_symbols: Sequence[str] = (),
    normalization: str = "identity",
) -> Tokenizer:
    """Trains a sentencepiece model on `sentences` (both languages, for a joint vocabulary).

    vocab_size is an upper bound: a small corpus may yield fewer pieces, as the synthetic task
    does. Sentencepiece keeps a random sample of at most `max_sentences` of them. Rare
    characters beyond `character_coverage` are spelled as bytes (byte fallback).
    `user_symbols` (e.g. (MASK_PIECE,)) become single pieces right after the special ids, and
    are never split when they occur in text. `normalization`: one of NORMALIZATIONS (see the
    module docstring).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} must be one of {NORMALIZATIONS}")
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as scratch:
        rules = _normalization_rules(normalization, scratch)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                byte_fallback=True,
                # A soft limit, so a corpus with few distinct pieces still trains.
                hard_vocab_limit=False,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
                user_defined_symbols=list(user_symbols),
                **rules,
            )
        except RuntimeError as e:
            if "required_chars" not in str(e):
                raise
            # sentencepiece's message names its own source file; say which setting to change.
            raise ValueError(
                f"vocab_size={vocab_size} is too small for the corpus's distinct characters plus "
                f"the special and user pieces; raise vocab_size ({e})"
            ) from e
    return Tokenizer(model.getvalue())


def _normalization_rules(normalization: str, folder: str) -> dict[str, str]:
    """sentencepiece's normalisation arguments; "zh_hans" writes its rule file into `folder`."""
    if normalization == "identity":
        return {"normalization_rule_name": "identity"}
    tsv = os.path.join(folder, "zh_hans.tsv")
    with open(tsv, "w", encoding="utf-8") as f:  # hex code points: source TAB target
        f.writelines(f"{ord(a):X}\t{ord(b):X}\n" for a, b in traditional_to_simplified())
    return {"normalization_rule_tsv": tsv}


def traditional_to_simplified() -> list[tuple[str, str]]:
    """(Traditional, Simplified) character pairs of OpenCC's t2s conversion, one per character
    it changes on its own (e.g. ("國", "国")); "zh_hans" normalisation's rules."""
    try:
        import opencc
    except ImportError as e:
        raise ImportError("normalization='zh_hans' needs OpenCC: pip install opencc") from e
    chars = [chr(c) for low, high in _CJK_RANGES for c in range(low, high + 1)]
    # One conversion call over all characters, a line each, so no two form a phrase.
    converted = opencc.OpenCC("t2s").convert("\n".join(chars)).split("\n")
    return [(a, b) for a, b in zip(chars, converted, strict=True) if len(b) == 1 and a != b]


def _sample_sentences(source: Sequence[dict[str, str]], max_pairs: int, seed: int) -> Iterator[str]:
    """Source and target sides of at most `max_pairs` examples of `source`, drawn at random.

    Only the drawn examples are read (in batched reads where the source has them), so a large
    training split costs no more than the sample.
    """
    count = min(len(source), max_pairs)
    indices = np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False))
    for chunk in np.array_split(indices, max(1, count // 1024)):
        if hasattr(source, "__getitems__"):
            examples = source.__getitems__(chunk.tolist())
        else:
            examples = [source[i] for i in chunk.tolist()]
        for example in examples:
            yield example["source"]
            if "target" in example:  # encoder-only tasks have one text per example
                yield example["target"]


def load_or_train_tokenizer(
    path: epath.PathLike,
    train_source: Sequence[dict[str, str]],
    *,
    vocab_size: int,
    model_type: str = "unigram",
    max_pairs: int = 100_000,
    seed: int = 0,
    user_symbols: Sequence[str] = (),
    normalization: str = "identity",
) -> Tokenizer:
    """Loads the model at `path` (e.g. `<workdir>/spm.model`), or trains and saves it there.

    Training reads both sides of up to `max_pairs` random examples of `train_source` (a
    sequence of {"source", "target"} dicts such as `TranslationData.source("train")`, or
    of {"source"} dicts for encoder-only tasks); `user_symbols` and `normalization` as in
    `train_tokenizer`.

    Raises:
      ValueError: the file at `path` is not a sentencepiece model, or has more ids than
        vocab_size, or another normalisation.
    """
    path = epath.Path(path)
    if path.exists():
        try:
            tokenizer = Tokenizer.load(path)
        except ValueError as e:
            # A resumed workdir's checkpoints rewrite a damaged spm.model before this
            # (tfjax.trainer): here the file is all there is.
            raise ValueError(f"{e}; remove it to train a new one") from e
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"{path} has {tokenizer.vocab_size} ids, more than vocab_size={vocab_size}"
            )
        if tokenizer.normalization != normalization:
            raise ValueError(
                f"{path} was trained with tokenizer_normalization={tokenizer.normalization!r}, "
                f"not {normalization!r}: use a new workdir, or the tokenizer's own setting"
            )
        logging.info("Loaded tokenizer %s: %d ids", path, tokenizer.vocab_size)
        return tokenizer
    logging.info("Training a %s tokenizer (vocab <= %d) for %s", model_type, vocab_size, path)
    sentences = _sample_sentences(train_source, max_pairs, seed)
    tokenizer = train_tokenizer(
        sentences,
        vocab_size=vocab_size,
        model_type=model_type,
        max_sentences=2 * max_pairs,
        user_symbols=user_symbols,
        normalization=normalization,
    )
    tokenizer.save(path)
    logging.info("Saved tokenizer %s: %d ids", path, tokenizer.vocab_size)
    return tokenizer
