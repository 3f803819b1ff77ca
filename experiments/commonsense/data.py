"""Commonsense data: load records, tokenise like LLM-Adapters, batch into a few fixed shapes.

Records have the LLM-Adapters fields ``instruction``, ``input``, ``output``, ``answer``.

* Training records come from a JSON/JSONL file (read here, so every error names the file
  and line) or a hub dataset id (``datasets.load_dataset(id)``), e.g. ``commonsense_170k.json``.
* Evaluation sets sit in the LLM-Adapters layout ``DIR/<task>/test.json`` (a JSON list).
* ``tokenize_example`` follows the authors: the whole prompt+response is tokenised with
  truncation at ``cutoff_len``, EOS is appended if there is room, and the loss covers the
  whole sequence (``train_on_inputs=True``); ``mask_prompt=True`` zeroes the loss on the
  prompt tokens instead.
* Batches are padded (right) to the smallest of a few *buckets* (powers of two up to the
  cutoff) that fits the longest row, so a jitted step compiles at most ``len(buckets)``
  times.
* ``BatchIterator`` yields fixed-size global batches in a per-epoch permutation drawn from
  ``(seed, epoch)`` (with ``rows``, only this process's share of each, for multi-host);
  ``state()`` / ``restore(state)`` give exact resumption (the training engine's
  data-iterator contract).

>>> buckets(256)
(16, 32, 64, 128, 256)
>>> bucket_for(40, buckets(256))
64
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from experiments.commonsense.config import UserError
from experiments.commonsense.prompt import build_prompt
from experiments.commonsense.tasks import check_task

REQUIRED_FIELDS = ("instruction", "output")


# ----------------------------------------------------------------------------- loading


def _check_records(records: Sequence[Any], where: str) -> list[dict]:
    if not isinstance(records, list):
        raise UserError(f"{where}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise UserError(f"{where}: holds no records")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise UserError(f"{where}: record {i} is a {type(r).__name__}, not an object with fields {REQUIRED_FIELDS}")
        missing = [f for f in REQUIRED_FIELDS if f not in r]
        if missing:
            raise UserError(f"{where}: record {i} lacks field(s) {missing}; LLM-Adapters records need {REQUIRED_FIELDS}")
        out.append({"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"],
                    "answer": r.get("answer", "")})
    return out


def read_json_records(path: str | os.PathLike) -> list:
    """The records of a ``.json`` file (a list) or ``.jsonl`` file (one object per line).

    Errors name the file (and line): truncated or invalid JSON, a top level that is not a list.
    """
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read ({e})") from None
    if p.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{p} line {n}: not valid JSON: {e.msg} (column {e.colno})") from None
        return records
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (truncated?)" if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated") else ""
        raise UserError(f"{p}: not valid JSON{hint}: {e.msg} (line {e.lineno}, column {e.colno})") from None


def load_train_records(source: str | os.PathLike, split: str = "train") -> list[dict]:
    """Training records from a local JSON/JSONL file or directory of them, or a hub dataset id."""
    src = str(source)
    path = pathlib.Path(src)
    if path.is_file():
        return _check_records(read_json_records(path), src)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise UserError(f"{src}: directory holds no .json/.jsonl file")
        return [r for f in files for r in _check_records(read_json_records(f), str(f))]
    if src.endswith((".json", ".jsonl")) or src.startswith((".", "/", "~")):
        raise UserError(f"training data {src}: no such file or directory")
    import datasets  # a hub id such as "zwhe99/commonsense_170k"

    try:
        ds = datasets.load_dataset(src, split=split)
    except Exception as e:  # offline, unknown dataset, no such split
        raise UserError(f"training data {src!r} is not a local file and loading it from the hub failed: "
                        f"{' '.join(str(e).split())}") from None
    return _check_records(ds.to_list(), src)


def load_eval_sets(eval_dir: str | os.PathLike, tasks: Sequence[str], limit: int | None = None) -> dict[str, list[dict]]:
    """``{task: records}`` from ``eval_dir/<task>/test.json``; ``limit`` keeps the first N of each."""
    root = pathlib.Path(eval_dir)
    if not root.is_dir():
        raise UserError(f"evaluation dir {root}: no such directory")
    out = {}
    for task in tasks:
        check_task(task)
        f = root / task / "test.json"
        if not f.exists():
            raise UserError(f"evaluation set {f} not found (expected the LLM-Adapters layout DIR/<task>/test.json)")
        recs = _check_records(read_json_records(f), str(f))
        for i, r in enumerate(recs):
            if not r["answer"]:
                raise UserError(f"{f}: record {i} has no 'answer'")
        out[task] = recs[:limit] if limit else recs
    return out


# ----------------------------------------------------------------------------- tokenising


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]  # token ids (BOS as the tokenizer adds it, EOS appended)
    loss_mask: tuple[int, ...]  # 1 where the token is a target of the loss


def _encode(tokenizer, text: str, cutoff_len: int) -> list[int]:
    return list(tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)["input_ids"])


def tokenize_example(tokenizer, record: Mapping[str, Any], cutoff_len: int, mask_prompt: bool = False) -> Example:
    """Tokenise one record as the LLM-Adapters fine-tuning script does.

    EOS is appended when the sequence is shorter than ``cutoff_len`` and does not already
    end with it. With ``mask_prompt`` the tokens of ``build_prompt(instruction, input)``
    (the prompt up to and including ``### Response:\\n``) get loss mask 0.
    """
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be >= 2, got {cutoff_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    ids = _encode(tokenizer, build_prompt(record["instruction"], record.get("input", ""), record["output"]), cutoff_len)
    if ids and ids[-1] != eos and len(ids) < cutoff_len:
        ids.append(eos)
    mask = [1] * len(ids)
    if mask_prompt:
        n = len(_encode(tokenizer, build_prompt(record["instruction"], record.get("input", "")), cutoff_len))
        mask = [0] * min(n, len(ids)) + mask[n:]
    return Example(tuple(ids), tuple(mask))


def tokenize_records(tokenizer, records: Sequence[Mapping[str, Any]], cutoff_len: int, mask_prompt: bool = False) -> list[Example]:
    return [tokenize_example(tokenizer, r, cutoff_len, mask_prompt) for r in records]


# ----------------------------------------------------------------------------- buckets / padding


def buckets(cutoff_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``cutoff_len``, then ``cutoff_len`` itself."""
    out, b = [], smallest
    while b < cutoff_len:
        out.append(b)
        b *= 2
    out.append(cutoff_len)
    return tuple(out)


def bucket_for(length: int, bucket_sizes: Sequence[int]) -> int:
    for b in bucket_sizes:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {bucket_sizes[-1]}")


def pad_batch(examples: Sequence[Example], pad_id: int, bucket_sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """Right-pad to the bucket of the longest row: ``input_ids``, ``attention_mask``, ``loss_mask`` [B, T]."""
    if not examples:
        raise ValueError("pad_batch: empty batch")
    t = bucket_for(max(len(e.input_ids) for e in examples), bucket_sizes)
    ids = np.full((len(examples), t), pad_id, np.int32)
    att = np.zeros((len(examples), t), np.int32)
    lm = np.zeros((len(examples), t), np.int32)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = e.input_ids
        att[i, :n] = 1
        lm[i, :n] = e.loss_mask
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm}


# ----------------------------------------------------------------------------- iterator


class BatchIterator:
    """Endless iterator of padded global batches; epochs are seeded permutations.

    ``state()`` is a small JSON-able dict ``{"epoch", "batch"}`` (the next batch to
    yield); ``restore(state)`` continues from there, so training resumed from a checkpoint
    sees exactly the batches an uninterrupted run would. The last incomplete batch of an
    epoch is dropped (every step has the same global batch size).

    >>> exs = [Example((1, 2, 3), (1, 1, 1))] * 10
    >>> it = BatchIterator(exs, batch_size=4, pad_id=0, bucket_sizes=(8,), seed=0)
    >>> it.steps_per_epoch, next(it)["input_ids"].shape
    (2, (4, 8))
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, bucket_sizes: Sequence[int],
                 seed: int = 0, rows: slice | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples are fewer than one batch of {batch_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.bucket_sizes = tuple(bucket_sizes)
        self.seed = seed
        self.rows = rows  # this process's rows of each global batch (multi-host); None = all
        self.epoch = 0
        self.batch = 0
        self._perm_epoch = -1
        self._perm = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._perm_epoch = epoch
        return self._perm

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "num_examples": len(self.examples)}

    def restore(self, state: Mapping[str, int]) -> None:
        if int(state.get("num_examples", len(self.examples))) != len(self.examples):
            raise ValueError(
                f"data iterator state was saved for {state['num_examples']} examples, this run has {len(self.examples)}"
            )
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"data iterator state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch >= self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        perm = self._permutation(self.epoch)
        idx = perm[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        self.batch += 1
        batch = pad_batch([self.examples[i] for i in idx], self.pad_id, self.bucket_sizes)  # same bucket on every host
        return batch if self.rows is None else {k: v[self.rows] for k, v in batch.items()}
