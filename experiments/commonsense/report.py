"""Reporting: chance levels, per-task prediction files, the accuracy plot.

``plot`` draws one bar per task (after training; before training too when measured) with
each task's chance level as a tick, plus the average; matplotlib's Agg backend, no display.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping, Sequence

from experiments.commonsense.evaluate import TaskResult, candidate_labels
from gralora_jax import fileio


def chance_levels(eval_sets: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, float]:
    """Expected accuracy of a uniform guess among each question's options, per task and on average."""
    out = {}
    for task, recs in eval_sets.items():
        out[task] = sum(1.0 / len(candidate_labels(task, r["instruction"])) for r in recs) / max(len(recs), 1)
    out["average"] = sum(out.values()) / max(len(out), 1)
    return out


def write_predictions(directory: fileio.PathLike, results: Mapping[str, TaskResult]) -> None:
    """``directory/<task>.json``: per record the answer, the prediction and (generate) the output text."""
    for task, r in results.items():
        fileio.atomic_write_text(fileio.join(directory, f"{task}.json"), json.dumps(r.records, indent=1))


def plot(results: Mapping[str, Any], path: fileio.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    after = results["after"]["tasks"]
    names = list(after) + ["average"]
    vals = [100 * after[t] for t in after] + [100 * results["after"]["average"]]
    before = results.get("before")
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names) + 2), 4))
    x = range(len(names))
    w = 0.4 if before else 0.7
    if before:
        bvals = [100 * before["tasks"][t] for t in after] + [100 * before["average"]]
        ax.bar([i - w / 2 for i in x], bvals, w, label="before training", color="#bbbbbb")
        ax.bar([i + w / 2 for i in x], vals, w, label="after training", color="#3b7dd8")
    else:
        ax.bar(list(x), vals, w, label="accuracy", color="#3b7dd8")
    chance = results.get("chance", {})
    for i, t in enumerate(names):
        if t in chance:
            ax.hlines(100 * chance[t], i - 0.45, i + 0.45, colors="#d62728", linestyles="dashed",
                      label="chance" if i == 0 else None)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    fileio.atomic_write_bytes(path, buf.getvalue())
