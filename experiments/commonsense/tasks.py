"""The eight commonsense tasks of LLM-Adapters and the answer words each one uses.

One table, kept as data: for every task the labels a model may answer with. The
label words double as the extraction vocabulary (``evaluate.extract_answer``), the
candidates of log-likelihood scoring, and the synthetic generators' outputs.

>>> TASK_LABELS["piqa"]
('solution1', 'solution2')
>>> answer_sentence("boolq", "true")
'the correct answer is true'
"""

from __future__ import annotations

# Evaluation order of the paper's tables.
TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Challenge",
    "ARC-Easy",
    "openbookqa",
)

# Every answer word a task may use (ARC has a few five-option questions; social_i_qa three).
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}

# The LLM-Adapters output sentence; the label follows it.
ANSWER_PREFIX = "the correct answer is "


def answer_sentence(task: str, label: str) -> str:
    """The training target the LLM-Adapters data uses for ``label``."""
    check_task(task)
    return ANSWER_PREFIX + label


def check_task(task: str) -> str:
    if task not in TASK_LABELS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def parse_tasks(spec: str | None) -> tuple[str, ...]:
    """``"boolq,piqa"`` -> ``("boolq", "piqa")``; ``None``/``""``/``"all"`` -> all eight.

    >>> parse_tasks("piqa, boolq")
    ('piqa', 'boolq')
    """
    if spec is None or spec.strip() in ("", "all"):
        return TASKS
    out = tuple(t.strip() for t in spec.split(",") if t.strip())
    for t in out:
        check_task(t)
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate task in {spec!r}")
    return out


def choices_in(task: str, n_options: int) -> tuple[str, ...]:
    """The first ``n_options`` labels of ``task`` (boolq: both words)."""
    labels = TASK_LABELS[check_task(task)]
    if task == "boolq":
        return labels
    if not 1 <= n_options <= len(labels):
        raise ValueError(f"{task} has at most {len(labels)} options, got {n_options}")
    return labels[:n_options]
