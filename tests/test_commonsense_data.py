"""experiments/commonsense: answer extraction, prompt + masking, buckets, data loading, iterator, synthetic data."""

import json
import random

import numpy as np
import pytest

from experiments.commonsense import data as D
from experiments.commonsense import embedded, synthetic
from experiments.commonsense.cli import parse
from experiments.commonsense.config import EMBEDDED, PAPER, ExperimentConfig, UserError, make_config, mesh_devices
from experiments.commonsense.evaluate import candidate_labels, extract_answer, format_table, summarize, TaskResult
from experiments.commonsense.prompt import RESPONSE_MARKER, build_prompt, response_of
from experiments.commonsense.tasks import TASK_LABELS, TASKS, parse_tasks

# ----------------------------------------------------------------------------- extraction
# Expected values follow LLM-Adapters' rule by hand: the first regex match of the task's
# words (no word boundary, case-sensitive) in the stripped output, '' when none.
EXTRACT_CASES = [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "false, definitely not true", "false"),
    ("boolq", "It is True", ""),  # case-sensitive
    ("boolq", "untrue", "true"),  # no word boundary in the authors' regex
    ("boolq", "", ""),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "solution1 or solution2? solution2", "solution1"),
    ("piqa", "Solution2", ""),
    ("piqa", "the correct answer is answer1", ""),  # another task's words do not count
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("social_i_qa", "  answer1\n", "answer1"),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "ending5 ending2", "ending2"),  # ending5 is not a hellaswag word
    ("winogrande", "the correct answer is option2", "option2"),
    ("winogrande", "option3", ""),
    ("ARC-Challenge", "the correct answer is answer5", "answer5"),
    ("ARC-Challenge", "answer12", "answer1"),  # prefix match, as the authors
    ("ARC-Easy", "the correct answer is answer4</s>", "answer4"),
    ("openbookqa", "no idea", ""),
    ("openbookqa", "the correct answer is answer2 because answer1 is wrong", "answer2"),
]


@pytest.mark.parametrize("task,text,want", EXTRACT_CASES)
def test_extract_answer(task, text, want):
    assert extract_answer(task, text) == want


def test_every_task_extracts_each_label():
    for task in TASKS:
        for lab in TASK_LABELS[task]:
            assert extract_answer(task, f"the correct answer is {lab}") == lab


def test_extract_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        extract_answer("mmlu", "true")


def test_candidate_labels_from_instruction():
    instr = "Q?\n\nAnswer1: a\n\nAnswer2: b\n\nAnswer3: c\n\nAnswer format: answer1/answer2/answer3"
    assert candidate_labels("social_i_qa", instr) == ("answer1", "answer2", "answer3")
    assert candidate_labels("boolq", "anything") == ("true", "false")
    assert candidate_labels("piqa", "no labels here") == ("solution1", "solution2")


def test_parse_tasks():
    assert parse_tasks("all") == TASKS
    assert parse_tasks("boolq, ARC-Easy") == ("boolq", "ARC-Easy")
    with pytest.raises(ValueError):
        parse_tasks("boolq,nope")


def test_summary_and_table():
    res = {"boolq": TaskResult("boolq", 3, 4), "piqa": TaskResult("piqa", 1, 4)}
    s = summarize(res)
    assert s["tasks"] == {"boolq": 0.75, "piqa": 0.25} and s["average"] == pytest.approx(0.5)
    table = format_table(s)
    assert "75.00" in table and "25.00" in table and "average" in table and "50.00" in table


# ----------------------------------------------------------------------------- prompt / tokenising


def test_prompt_template():
    p = build_prompt("Do X.", "", "done")
    assert p == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X.\n\n### Response:\ndone"
    )
    q = build_prompt("Do X.", "ctx")
    assert q.startswith("Below is an instruction that describes a task, paired with an input")
    assert "\n\n### Input:\nctx\n\n### Response:\n" in q and q.endswith(RESPONSE_MARKER + "\n")
    assert response_of(build_prompt("a", output="the correct answer is true")) == "the correct answer is true"


@pytest.fixture(scope="module")
def tokenizer():
    tr, te = synthetic.make_splits(8, 2, seed=1)
    recs = tr + [r for v in te.values() for r in v]
    return embedded.build_tokenizer(synthetic.corpus(recs) + ["hello world , a b c"])


def test_tokenize_example_eos_and_mask(tokenizer):
    rec = {"instruction": "Please answer the following question with true or false, question: is a dog a animal?",
           "input": "", "output": "the correct answer is true"}
    full = D.tokenize_example(tokenizer, rec, cutoff_len=256)
    ids = list(full.input_ids)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert full.loss_mask == (1,) * len(ids)  # whole sequence, as the authors
    want = tokenizer(build_prompt(rec["instruction"], "", rec["output"]))["input_ids"] + [tokenizer.eos_token_id]
    assert ids == want
    masked = D.tokenize_example(tokenizer, rec, cutoff_len=256, mask_prompt=True)
    n_prompt = len(tokenizer(build_prompt(rec["instruction"]))["input_ids"])
    assert masked.input_ids == full.input_ids
    assert masked.loss_mask == (0,) * n_prompt + (1,) * (len(ids) - n_prompt)
    # the unmasked targets decode to the response + EOS
    tail = [t for t, m in zip(ids, masked.loss_mask) if m]
    assert tokenizer.decode(tail[:-1]) == "the correct answer is true" and tail[-1] == tokenizer.eos_token_id


def test_tokenize_truncation_has_no_eos(tokenizer):
    rec = {"instruction": "is a dog a animal ?", "input": "", "output": "the correct answer is true"}
    ex = D.tokenize_example(tokenizer, rec, cutoff_len=10)
    assert len(ex.input_ids) == 10 and ex.input_ids[-1] != tokenizer.eos_token_id


def test_buckets_and_padding():
    assert D.buckets(256) == (16, 32, 64, 128, 256)
    assert D.buckets(100) == (16, 32, 64, 100)
    assert D.bucket_for(16, (16, 32)) == 16 and D.bucket_for(17, (16, 32)) == 32
    with pytest.raises(ValueError):
        D.bucket_for(33, (16, 32))
    b = D.pad_batch([D.Example((5, 6, 7), (0, 1, 1)), D.Example(tuple(range(1, 21)), (1,) * 20)], 0, (16, 32))
    assert b["input_ids"].shape == (2, 32)
    np.testing.assert_array_equal(b["input_ids"][0, :4], [5, 6, 7, 0])
    np.testing.assert_array_equal(b["attention_mask"].sum(1), [3, 20])
    np.testing.assert_array_equal(b["loss_mask"][0, :4], [0, 1, 1, 0])


# ----------------------------------------------------------------------------- loading files


def _records(n, task="boolq"):
    rng = random.Random(0)
    return [synthetic.make_example(task, rng) for _ in range(n)]


def test_load_train_json_and_jsonl(tmp_path):
    recs = _records(5)
    (tmp_path / "train.json").write_text(json.dumps(recs))
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    a = D.load_train_records(tmp_path / "train.json")
    b = D.load_train_records(tmp_path / "train.jsonl")
    assert a == b == [{k: r[k] for k in ("instruction", "input", "output", "answer")} for r in recs]
    with pytest.raises(ValueError, match="no such file"):
        D.load_train_records(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="lacks field"):
        D.load_train_records(tmp_path / "bad.json")


def test_load_eval_sets_layout(tmp_path):
    for task in ("boolq", "piqa"):
        (tmp_path / task).mkdir()
        (tmp_path / task / "test.json").write_text(json.dumps(_records(7, task)))
    sets = D.load_eval_sets(tmp_path, ("piqa", "boolq"), limit=3)
    assert list(sets) == ["piqa", "boolq"] and all(len(v) == 3 for v in sets.values())
    assert sets["piqa"][0]["answer"] in ("solution1", "solution2")
    with pytest.raises(ValueError, match="not found"):
        D.load_eval_sets(tmp_path, ("hellaswag",))


# ----------------------------------------------------------------------------- iterator


def _examples(n):
    return [D.Example(tuple(range(1, 3 + i % 5)), (1,) * (2 + i % 5)) for i in range(n)]


def test_iterator_epochs_are_permutations():
    exs = _examples(20)
    it = D.BatchIterator(exs, 5, 0, (8,), seed=3)
    seen = [tuple(map(tuple, next(it)["input_ids"])) for _ in range(4)]
    rows = [r for b in seen for r in b]
    assert sorted(rows) == sorted(tuple(list(e.input_ids) + [0] * (8 - len(e.input_ids))) for e in exs)
    e2 = [tuple(map(tuple, next(it)["input_ids"])) for _ in range(4)]
    assert it.state()["epoch"] == 1 and e2 != seen  # a new order next epoch


def test_iterator_state_restore_is_exact():
    exs = _examples(23)
    ref = D.BatchIterator(exs, 4, 0, (8,), seed=7)
    stream = [next(ref)["input_ids"] for _ in range(12)]  # crosses an epoch (5 steps/epoch)
    a = D.BatchIterator(exs, 4, 0, (8,), seed=7)
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state()))  # must survive JSON (checkpoint metadata)
    b = D.BatchIterator(exs, 4, 0, (8,), seed=7)
    b.restore(state)
    for i in range(7, 12):
        np.testing.assert_array_equal(next(b)["input_ids"], stream[i])
    with pytest.raises(ValueError, match="examples"):
        D.BatchIterator(_examples(30), 4, 0, (8,), seed=7).restore(state)
    with pytest.raises(ValueError, match="seed"):
        D.BatchIterator(exs, 4, 0, (8,), seed=8).restore(state)


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_format_and_heldout(tmp_path):
    train_file, root = synthetic.write_synthetic(tmp_path, n_train_per_task=30, n_test_per_task=10, seed=0)
    train = json.loads(train_file.read_text())
    assert len(train) == 30 * len(TASKS)
    train_instr = {r["instruction"] for r in train}
    for task in TASKS:
        test = json.loads((root / task / "test.json").read_text())
        assert len(test) == 10
        for r in test:
            assert set(r) == {"instruction", "input", "output", "answer"}
            assert r["answer"] in TASK_LABELS[task] and r["output"] == "the correct answer is " + r["answer"]
            assert r["answer"] in candidate_labels(task, r["instruction"])
            assert r["instruction"] not in train_instr
    boolq = json.loads((root / "boolq" / "test.json").read_text())
    assert sum(r["answer"] == "true" for r in boolq) == 5
    piqa = json.loads((root / "piqa" / "test.json").read_text())[0]["instruction"]
    assert piqa.startswith("Please choose the correct solution to the question: ")
    assert "\n\nSolution1: " in piqa and piqa.endswith("Answer format: solution1/solution2")


def test_synthetic_right_option_matches_the_kind():
    rng = random.Random(5)
    kind_of = {t: k for k, (things, _) in synthetic.WORLD.items() for t in things}
    for _ in range(50):
        r = synthetic.make_example("ARC-Easy", rng)
        idx = int(r["answer"][-1])
        line = [l for l in r["instruction"].split("\n\n") if l.startswith(f"Answer{idx}: ")][0]
        asked = r["instruction"].split("?")[0].split()[-1]
        assert kind_of[line.split(": ")[1]] == asked


# ----------------------------------------------------------------------------- config


def test_presets_and_validation():
    cfg = parse(["--mesh", "4x2"])
    assert cfg.embedded and cfg.r == EMBEDDED["r"] and cfg.mask_prompt and cfg.eval_before and cfg.mesh == "4x2"
    cfg = parse(["--model", "x", "--train-data", "t.json", "--eval-dir", "e", "--r", "8", "--tasks", "piqa"])
    assert (cfg.r, cfg.alpha, cfg.k, cfg.dropout, cfg.lr, cfg.batch_size, cfg.cutoff_len, cfg.optimizer, cfg.dtype) == (
        8, 128, 4, 0.05, 2e-4, 192, 256, "lion", "bfloat16")
    assert PAPER["alpha"] == 128 and cfg.tasks == ("piqa",) and not cfg.mask_prompt
    with pytest.raises(UserError, match="multiple"):
        ExperimentConfig(batch_size=10, micro_batch_size=4)
    with pytest.raises(UserError, match="method"):
        ExperimentConfig(method="dora")
    assert mesh_devices(make_config(mesh="4x2")) == 8 and mesh_devices(make_config(mesh="2x2x2")) == 8
    with pytest.raises(UserError, match="--mesh"):
        make_config(mesh="4by2")


def test_iterator_process_rows_partition_the_global_batch():
    exs = _examples(16)
    full = next(D.BatchIterator(exs, 8, 0, (8,), seed=1))["input_ids"]
    parts = [next(D.BatchIterator(exs, 8, 0, (8,), seed=1, rows=slice(i * 4, (i + 1) * 4)))["input_ids"] for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(parts), full)
