"""Evaluate on the LLM-Adapters test sets: generate and extract, or score the options.

Two modes, both batched, jitted and sharded over the mesh's data axis (the batch is
padded to a multiple of the data-parallel size; padding rows are dropped):

* ``generate`` (the authors' protocol): the prompt ``build_prompt(instruction, input)``
  ends with ``### Response:``; the model continues greedily (``num_beams=1``) or by beam
  search (``num_beams=4`` as the authors), and :func:`extract_answer` takes the *first*
  occurrence of the task's answer words in the decoded continuation. No match counts as
  wrong.
* ``loglik``: for each option label of the question (the task's label words that the
  instruction mentions), score ``log p("the correct answer is <label>" + EOS | prompt)``
  and pick the best. One forward per candidate, no decoding loop.

Generation is :func:`gralora_jax.models.generate` (KV cache, transformers-style beam search),
the one decoder of the library, for our models and transformers' Flax models alike: the
caller passes ``generate_fn(params, input_ids, attention_mask) -> [B, P + new]`` over
left-padded prompts (``experiments.commonsense.run.make_decoder`` builds it with the adapters
routed in). Log-likelihood scoring runs a pure ``logits_fn(params, input_ids, attention_mask)``.

>>> extract_answer("piqa", "the correct answer is solution2, not solution1")
'solution2'
>>> extract_answer("boolq", "The answer is True")  # case-sensitive, as the authors
''
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from experiments.commonsense import data as data_lib
from experiments.commonsense.prompt import build_prompt
from experiments.commonsense.tasks import ANSWER_PREFIX, TASK_LABELS, check_task

EVAL_MODES = ("generate", "loglik")

# The authors' extraction patterns: alternatives in order, no word boundaries, case-sensitive.
_PATTERNS = {task: re.compile("|".join(labels)) for task, labels in TASK_LABELS.items()}


def extract_answer(task: str, text: str) -> str:
    """The first of ``task``'s answer words in ``text`` ('' if none), as LLM-Adapters does."""
    check_task(task)
    m = _PATTERNS[task].search(text.strip())
    return m.group(0) if m else ""


def candidate_labels(task: str, instruction: str) -> tuple[str, ...]:
    """The labels a question offers: boolq's two words, else the task's labels named in the instruction.

    >>> candidate_labels("ARC-Easy", "Q?\\n\\nAnswer1: a\\n\\nAnswer2: b\\n\\nAnswer format: answer1/answer2")
    ('answer1', 'answer2')
    """
    labels = TASK_LABELS[check_task(task)]
    if task == "boolq":
        return labels
    low = instruction.lower()
    found = tuple(lab for lab in labels if re.search(re.escape(lab) + r"(?!\d)", low))
    return found or labels


@dataclass
class TaskResult:
    task: str  # task name
    correct: int  # number of exact matches with ``answer``
    total: int  # number of scored records
    records: list[dict] = field(default_factory=list)  # per record: answer, pred, output (generate) / scores

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def summarize(results: Mapping[str, TaskResult]) -> dict[str, Any]:
    """``{"tasks": {task: accuracy}, "average": mean accuracy, "counts": {task: [correct, total]}}``."""
    accs = {t: r.accuracy for t, r in results.items()}
    return {
        "tasks": accs,
        "average": float(np.mean(list(accs.values()))) if accs else 0.0,
        "counts": {t: [r.correct, r.total] for t, r in results.items()},
    }


def format_table(summary: Mapping[str, Any], title: str = "") -> str:
    """A plain-text table of per-task accuracy (percent) and the average."""
    rows = list(summary["tasks"].items()) + [("average", summary["average"])]
    w = max(len(t) for t, _ in rows)
    lines = [title] if title else []
    lines += [f"{'task':<{w}}  accuracy", f"{'-' * w}  --------"]
    for t, a in rows:
        if t == "average":
            lines.append(f"{'-' * w}  --------")
        lines.append(f"{t:<{w}}  {100 * a:7.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sharded batches


def _pad_rows(arrays: Mapping[str, np.ndarray], multiple: int, rows: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Repeat the last row up to ``rows`` (the fixed batch size) or the next multiple of ``multiple``."""
    n = next(iter(arrays.values())).shape[0]
    m = -(-max(n, rows or 0) // multiple) * multiple
    if m == n:
        return dict(arrays), n
    return {k: np.concatenate([v, np.repeat(v[-1:], m - n, axis=0)], 0) for k, v in arrays.items()}, n


def _place(arrays: Mapping[str, np.ndarray], mesh) -> dict:
    """The whole eval batch (every process holds the same) onto the mesh, rows over the data axes."""
    import jax

    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in arrays.items()}
    from gralora_jax import sharding
    from gralora_jax.distributed import put_global

    return put_global(dict(arrays), sharding.batch_sharding(mesh))


def _fetch(x) -> np.ndarray:
    """A batch-sharded output as one host array, on every process (rows may live on other hosts)."""
    from gralora_jax.distributed import gather_to_host

    return gather_to_host(x)


def _dp_size(mesh) -> int:
    if mesh is None:
        return 1
    from gralora_jax import sharding

    return sharding.data_parallel_size(mesh)


# ----------------------------------------------------------------------------- generation


def generate_answers(
    generate_fn: Callable,
    params: Any,
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    max_prompt_len: int = 512,
    mesh=None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Decoded continuations after ``### Response:`` for every record (special tokens skipped).

    ``generate_fn(params, input_ids, attention_mask) -> [B, P + new]`` takes left-padded prompts
    (the :func:`gralora_jax.models.generate` contract; it fixes the number of new tokens and
    beams). ``on_batch(n)`` is called after each batch of ``n`` records.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    prompts = [_encode(tokenizer, build_prompt(r["instruction"], r.get("input", "")), max_prompt_len) for r in records]
    dp = _dp_size(mesh)
    bs = max(dp, -(-batch_size // dp) * dp)
    texts: list[str] = []
    # Few, coarse prompt shapes and a fixed batch size: each shape is one compilation.
    bucket_sizes = data_lib.buckets(max(128, 1 << (max_prompt_len - 1).bit_length()), smallest=128)
    for s in range(0, len(prompts), bs):
        chunk = prompts[s : s + bs]
        p_len = data_lib.bucket_for(max(len(p) for p in chunk), bucket_sizes)
        ids = np.full((len(chunk), p_len), pad, np.int32)
        att = np.zeros((len(chunk), p_len), np.int32)
        for i, p in enumerate(chunk):
            ids[i, p_len - len(p) :] = p
            att[i, p_len - len(p) :] = 1
        arrays, n = _pad_rows({"ids": ids, "att": att}, dp, bs)
        placed = _place(arrays, mesh)
        out = _fetch(generate_fn(params, placed["ids"], placed["att"]))[:n, p_len:]
        texts += [_decode(tokenizer, row, eos) for row in out]
        if on_batch:
            on_batch(len(chunk))
    return texts


def _decode(tokenizer, row, eos: int) -> str:
    toks = [int(t) for t in row]
    if eos in toks:
        toks = toks[: toks.index(eos)]
    return tokenizer.decode(toks, skip_special_tokens=True)


def _encode(tokenizer, text: str, max_len: int) -> list[int]:
    ids = list(tokenizer(text, padding=False)["input_ids"])
    if len(ids) > max_len:  # keep the end: the question and "### Response:" must survive
        ids = ids[-max_len:]
    return ids


# ----------------------------------------------------------------------------- log-likelihood scoring


def _compile_scorer(logits_fn: Callable):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def score(params, ids, att, mask):
        logits = logits_fn(params, ids, att)[:, :-1].astype(jnp.float32)
        lp = jax.nn.log_softmax(logits, axis=-1)
        tok = jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        return (tok * mask[:, 1:]).sum(-1)

    return score


def score_options(
    logits_fn: Callable,
    params: Any,
    tokenizer,
    task: str,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 64,
    cutoff_len: int = 256,
    mesh=None,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Per record ``{label: log p(answer sentence of label | prompt)}``; ``on_batch(n)``: ``n`` more records done."""
    scorer = _compile_scorer(logits_fn)
    rows: list[tuple[int, str, data_lib.Example]] = []
    for i, r in enumerate(records):
        for lab in candidate_labels(task, r["instruction"]):
            rec = {"instruction": r["instruction"], "input": r.get("input", ""), "output": ANSWER_PREFIX + lab}
            rows.append((i, lab, data_lib.tokenize_example(tokenizer, rec, cutoff_len, mask_prompt=True)))
    dp = _dp_size(mesh)
    bs = max(dp, -(-batch_size // dp) * dp)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bucket_sizes = data_lib.buckets(max(cutoff_len, 128), smallest=128)
    out: list[dict[str, float]] = [{} for _ in records]
    for s in range(0, len(rows), bs):
        chunk = rows[s : s + bs]
        batch = data_lib.pad_batch([e for _, _, e in chunk], pad, bucket_sizes)
        arrays, n = _pad_rows(batch, dp, bs)
        placed = _place(arrays, mesh)
        vals = _fetch(scorer(params, placed["input_ids"], placed["attention_mask"], placed["loss_mask"]))[:n]
        for (i, lab, _), v in zip(chunk, vals):
            out[i][lab] = float(v)
        if on_batch:  # records whose last option was scored in this batch
            on_batch(sum(1 for j in range(s, s + len(chunk)) if j + 1 == len(rows) or rows[j + 1][0] != rows[j][0]))
    return out


# ----------------------------------------------------------------------------- the evaluation


def evaluate_task(
    logits_fn: Callable,
    params: Any,
    tokenizer,
    task: str,
    records: Sequence[Mapping[str, Any]],
    *,
    mode: str = "generate",
    batch_size: int = 32,
    cutoff_len: int = 256,
    mesh=None,
    generate_fn: Callable | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> TaskResult:
    """Accuracy of one task by ``mode``: "generate" (needs ``generate_fn``, see :func:`generate_answers`)
    or "loglik" (``logits_fn``)."""
    if mode not in EVAL_MODES:
        raise ValueError(f"eval mode must be one of {EVAL_MODES}, got {mode!r}")
    if mode == "generate" and generate_fn is None:
        raise ValueError("eval mode 'generate' needs a generate_fn (gralora_jax.models.generate over the model)")
    check_task(task)
    res = TaskResult(task, 0, len(records))
    if mode == "generate":
        outs = generate_answers(generate_fn, params, tokenizer, records, batch_size=batch_size,
                                max_prompt_len=cutoff_len, mesh=mesh, on_batch=on_batch)
        for r, o in zip(records, outs):
            pred = extract_answer(task, o)
            res.correct += pred == r["answer"]
            res.records.append({"answer": r["answer"], "pred": pred, "output_pred": o, "flag": pred == r["answer"]})
    else:
        scores = score_options(logits_fn, params, tokenizer, task, records, batch_size=batch_size,
                               cutoff_len=cutoff_len, mesh=mesh, on_batch=on_batch)
        for r, sc in zip(records, scores):
            pred = max(sc, key=sc.get)
            res.correct += pred == r["answer"]
            res.records.append({"answer": r["answer"], "pred": pred, "scores": sc, "flag": pred == r["answer"]})
    return res


def evaluate_all(
    logits_fn: Callable, params: Any, tokenizer, eval_sets: Mapping[str, Sequence[Mapping[str, Any]]], *,
    log: Callable[[str], None] | None = None, progress: bool = False, **kw
) -> dict[str, TaskResult]:
    """:func:`evaluate_task` over ``{task: records}``, in order; ``progress``: a tqdm bar over all records."""
    out = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(r) for r in eval_sets.values()), desc="eval", unit="q", dynamic_ncols=True)
    try:
        for task, recs in eval_sets.items():
            if bar is not None:
                bar.set_postfix(task=task)
            out[task] = evaluate_task(logits_fn, params, tokenizer, task, recs,
                                      on_batch=bar.update if bar is not None else None, **kw)
            if log:
                msg = f"  {task}: {100 * out[task].accuracy:.2f}% ({out[task].correct}/{out[task].total})"
                bar.write(msg) if bar is not None else log(msg)
    finally:
        if bar is not None:
            bar.close()
    return out
