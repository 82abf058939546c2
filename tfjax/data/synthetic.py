"""The built-in synthetic task: English number words into German or Chinese, built offline.

A sentence lists one to three numbers from 0 to 999, e.g.

  en  "thirty-four, one hundred five and twenty"
  de  "vierunddreißig, einhundertfünf und zwanzig"
  zh  "三十四、一百零五和二十"

Translating needs attention and reordering: German says units before tens ("vier-und-
dreißig") and writes a number as one word; Chinese writes digits with place words, says
零 for an inner zero, and drops the 一 of a leading ten (十五) but not an inner one (一百一十).
Conventions, fixed so every number has one translation:
  - English is American style without "and" inside a number ("one hundred five"), so "and"
    only ever joins the list; tens and units are hyphenated ("thirty-four").
  - German: "eins" alone or at the end (101 "einhunderteins"), "ein" before "und" or
    "hundert" (21 "einundzwanzig", 100 "einhundert"); 16 "sechzehn", 17 "siebzehn".
  - Chinese: 二百 (not 两百) for 200, 一百一十 for 110, 零 for 0.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import tensorflow_datasets as tfds

from tfjax.data.folder import LocalDatasetInfo

LANGUAGES = ("de", "zh")  # target languages the task can be built for (the source is "en")

_EN_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_DE_UNITS = (
    "null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn "
    "fünfzehn sechzehn siebzehn achtzehn neunzehn"
).split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()
_ZH_DIGITS = "零一二三四五六七八九"

# How lists of 1, 2 and 3 numbers are written, per language.
_TEMPLATES = {
    "en": ("{}", "{} and {}", "{}, {} and {}"),
    "de": ("{}", "{} und {}", "{}, {} und {}"),
    "zh": ("{}", "{}和{}", "{}、{}和{}"),
}


def english(n: int) -> str:
    """0 <= n < 1000 in English words: 34 -> "thirty-four", 105 -> "one hundred five"."""
    _check_range(n)
    if n < 20:
        return _EN_UNITS[n]
    if n < 100:
        tens, units = divmod(n, 10)
        return _EN_TENS[tens] + (f"-{_EN_UNITS[units]}" if units else "")
    hundreds, rest = divmod(n, 100)
    return f"{_EN_UNITS[hundreds]} hundred" + (f" {english(rest)}" if rest else "")


def german(n: int) -> str:
    """0 <= n < 1000 as one German word: 34 -> "vierunddreißig", 101 -> "einhunderteins"."""
    _check_range(n)
    if n < 20:
        return _DE_UNITS[n]
    if n < 100:
        tens, units = divmod(n, 10)
        return (f"{_de_prefix(units)}und" if units else "") + _DE_TENS[tens]
    hundreds, rest = divmod(n, 100)
    return f"{_de_prefix(hundreds)}hundert" + (german(rest) if rest else "")


def _de_prefix(digit: int) -> str:
    """A unit digit in front of "und" or "hundert": 1 is "ein", not "eins"."""
    return "ein" if digit == 1 else _DE_UNITS[digit]


def chinese(n: int) -> str:
    """0 <= n < 1000 in Chinese numerals: 10 十, 34 三十四, 105 一百零五, 110 一百一十."""
    _check_range(n)
    if n < 10:
        return _ZH_DIGITS[n]
    if n < 100:
        tens, units = divmod(n, 10)
        # A leading ten is said without its 一: 十五, not 一十五.
        return (_ZH_DIGITS[tens] if tens > 1 else "") + "十" + (_ZH_DIGITS[units] if units else "")
    hundreds, rest = divmod(n, 100)
    if rest == 0:
        tail = ""
    elif rest < 10:
        tail = "零" + _ZH_DIGITS[rest]
    else:
        tens, units = divmod(rest, 10)
        # Inside a larger number the ten keeps its 一: 一百一十 (110).
        tail = _ZH_DIGITS[tens] + "十" + (_ZH_DIGITS[units] if units else "")
    return _ZH_DIGITS[hundreds] + "百" + tail


def _check_range(n: int) -> None:
    if not 0 <= n < 1000:
        raise ValueError(f"the synthetic task covers 0..999, got {n}")


_SAY = {"en": english, "de": german, "zh": chinese}


def sentence(numbers: list[int], language: str) -> str:
    """A list of 1-3 numbers as a sentence of `language` ("en", "de" or "zh")."""
    words = [_SAY[language](n) for n in numbers]
    return _TEMPLATES[language][len(numbers) - 1].format(*words)


def _sample_numbers(rng: random.Random) -> list[int]:
    """1-3 numbers, each with 1, 2 or 3 digits equally often (not uniform over 0..999).

    Lone numbers are drawn less often: there are only 1000 distinct ones.
    """
    count = rng.choices((1, 2, 3), weights=(1, 3, 3))[0]
    low_high = ((0, 9), (10, 99), (100, 999))
    return [rng.randint(*rng.choice(low_high)) for _ in range(count)]


def generate_splits(
    language: str, *, seed: int, train_size: int, eval_size: int
) -> dict[str, list[tuple[str, str]]]:
    """(English, `language`) pairs for "train", "validation" and "test"; no sentence repeats.

    Test and validation are drawn first, then train, from one seeded stream, skipping any
    English sentence drawn before, so the splits are disjoint and fixed by the seed.
    """
    _check_language(language)
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str]]] = {}
    for split, size in (("test", eval_size), ("validation", eval_size), ("train", train_size)):
        pairs = splits[split] = []
        while len(pairs) < size:
            numbers = _sample_numbers(rng)
            source = sentence(numbers, "en")
            if source not in seen:
                seen.add(source)
                pairs.append((source, sentence(numbers, language)))
    return splits


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"synthetic target language {language!r}; expected one of {LANGUAGES}")


@dataclasses.dataclass
class NumbersConfig(tfds.core.BuilderConfig):
    """Target language, seed and split sizes of one build (TFDS needs defaults)."""

    language: str = "de"
    seed: int = 0
    train_size: int = 40_000
    eval_size: int = 1_000


class SyntheticNumbers(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder of the number-words task; record i of a split is its i-th generated pair."""

    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to find. TFDS 4.9.10's own lookup of the code path needs the
    # `importlib_resources` backport on Python >= 3.9 and fails without it.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self,
            description="English number words (0-999, lists of 1-3) and their translation.",
            features=tfds.features.Translation(languages=("en", self.builder_config.language)),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Generated locally.
        cfg = self.builder_config
        splits = generate_splits(
            cfg.language, seed=cfg.seed, train_size=cfg.train_size, eval_size=cfg.eval_size
        )
        return {split: self._generate_examples(pairs) for split, pairs in splits.items()}

    def _generate_examples(self, pairs: list[tuple[str, str]]) -> Iterator[tuple[int, dict]]:
        language = self.builder_config.language
        for index, (source, target) in enumerate(pairs):
            yield index, {"en": source, language: target}


def build_synthetic(
    language: str,
    data_dir: str | None,
    *,
    seed: int = 0,
    train_size: int = 40_000,
    eval_size: int = 1_000,
) -> str:
    """Builds the task for `language` into `data_dir` unless already there; returns its path."""
    _check_language(language)
    config = NumbersConfig(
        name=f"en-{language}-seed{seed}-train{train_size}-eval{eval_size}",
        language=language,
        seed=seed,
        train_size=train_size,
        eval_size=eval_size,
    )
    builder = SyntheticNumbers(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)
