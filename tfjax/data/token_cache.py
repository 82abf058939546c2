"""A training split tokenized once into memory-mapped arrays, so epochs skip reading and tokenizing.

Reading a TFDS array_record example and running sentencepiece on both sides costs about 50
us an example on a 2-core CPU: 5 ms for a Multi30k batch of ~100 pairs, more than the
training loop's whole host budget. `cached_split` tokenizes this process's shard once (a
progress bar shows it), writes it under the workdir, and later runs and resumes map it back.

On disk, one folder per (split, shard, tokenizer, dataset), written under a temporary name
and renamed when complete, so an interrupted build leaves nothing that looks finished:
  meta.json          the key it was built for, example count, sides, labelled or not
  <side>.ids.npy     [total tokens] int32, the examples' ids end to end (eos included)
  <side>.ends.npy    [examples] int64, example i is ids[ends[i - 1]:ends[i]]
  label.npy          [examples] int32, classification only
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from tqdm import tqdm

FORMAT = 1  # bump when the layout or what an example holds changes: older folders are rebuilt
BUILD_CHUNK = 4096  # examples read and tokenized per call while building

Example = dict[str, Any]  # {"inputs": ids [n], "targets": ids [m]} (+ "label": int)


class TokenizedSplit:
    """One process's shard of a split, tokenized: `len()` and `examples(positions)`.

    Position p holds example `shard_index + p * shard_count` of the split, so the pipeline
    reads it as the whole (already sharded) source.
    """

    def __init__(self, directory: epath.Path):
        meta = json.loads((directory / "meta.json").read_text())
        self.size = meta["size"]
        self.shard = (meta["shard_index"], meta["shard_count"])
        self._sides = {}
        for side in meta["sides"]:
            # A plain ndarray over the map: numpy's memmap subclass makes every slice slower.
            ids = np.load(directory / f"{side}.ids.npy", mmap_mode="r").view(np.ndarray)
            ends = np.load(directory / f"{side}.ends.npy")
            if len(ends) != self.size or (self.size and ends[-1] != len(ids)):
                raise ValueError(f"{directory}: {side} arrays disagree with meta.json")
            self._sides[side] = (ids, np.concatenate([[0], ends]))  # [examples + 1] bounds
        self._labels = np.load(directory / "label.npy") if meta["labelled"] else None
        if self._labels is not None and len(self._labels) != self.size:
            raise ValueError(f"{directory}: label.npy disagrees with meta.json")

    def __len__(self) -> int:
        return self.size

    def examples(self, positions: Sequence[int]) -> list[Example]:
        """The examples at `positions`, as the pipeline's reader makes them."""
        positions = np.asarray(positions, np.int64)
        out: list[Example] = [{} for _ in positions]
        for side, (ids, bounds) in self._sides.items():
            starts, stops = bounds[positions].tolist(), bounds[positions + 1].tolist()
            for example, start, stop in zip(out, starts, stops, strict=True):
                example[side] = ids[start:stop]
        if self._labels is not None:
            for example, label in zip(out, self._labels[positions].tolist(), strict=True):
                example["label"] = np.int32(label)
        return out


def cached_split(
    read: Callable[[list[int]], list[Example]],
    size: int,
    root: epath.Path,
    *,
    name: str,
    identity: str,
    shard: tuple[int, int],
) -> TokenizedSplit | None:
    """This shard of a split as a TokenizedSplit under `root`, built on first use.

    read: split indices -> their tokenized examples (the pipeline's reader); size: examples in
    the split; name: the split's name (for the folder); identity: what the examples depend on
    (dataset, direction, tokenizer), hashed into the folder's key. None, with a warning, when
    the cache cannot be used (a non-local root, a write failure): the caller reads as before.
    """
    index, count = shard
    key = hashlib.sha256(f"{FORMAT}|{identity}|{size}|{index}/{count}".encode()).hexdigest()[:16]
    if not _is_local(root):
        logging.info("Not caching tokenized %s: %s is not a local folder", name, root)
        return None
    directory = epath.Path(root) / f"{name}-{index}-of-{count}-{key}"
    if directory.exists():
        try:
            return TokenizedSplit(directory)
        except (OSError, ValueError, KeyError) as e:  # A damaged folder: built again.
            logging.warning("Rebuilding the tokenized %s at %s: %s", name, directory, e)
            shutil.rmtree(directory, ignore_errors=True)
    try:
        _build(read, range(index, size, count), directory, key=key, shard=shard, name=name)
        return TokenizedSplit(directory)
    except OSError as e:
        logging.warning("Reading %s without a token cache: writing %s failed: %s", name, root, e)
        return None


def _build(
    read: Callable[[list[int]], list[Example]],
    indices: range,
    directory: epath.Path,
    *,
    key: str,
    shard: tuple[int, int],
    name: str,
) -> None:
    """Reads and tokenizes `indices` in chunks, then writes the folder atomically."""
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    sides: dict[str, list[np.ndarray]] = {}
    labels: list[int] = []
    with tqdm(total=len(indices), desc=f"tokenize {name}", unit="ex", leave=False) as bar:
        for start in range(0, len(indices), BUILD_CHUNK):
            for example in read(list(indices[start : start + BUILD_CHUNK])):
                for side, ids in example.items():
                    if side == "label":
                        labels.append(int(ids))
                    else:
                        sides.setdefault(side, []).append(ids)
            bar.update(min(BUILD_CHUNK, len(indices) - start))
    partial.mkdir(parents=True)
    for side, rows in sides.items():
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        np.save(partial / f"{side}.ids.npy", np.concatenate(rows).astype(np.int32))
        np.save(partial / f"{side}.ends.npy", np.cumsum(lengths))
    if labels:
        np.save(partial / "label.npy", np.asarray(labels, np.int32))
    meta = dict(
        key=key,
        size=len(indices),
        sides=list(sides),
        labelled=bool(labels),
        shard_index=shard[0],
        shard_count=shard[1],
    )
    (partial / "meta.json").write_text(json.dumps(meta))
    partial.rename(directory)
    logging.info("Tokenized %d examples of %s into %s", len(indices), name, directory)


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)
