"""experiments.commonsense CLI: user errors are one ``error:`` line with exit 2, found before the model loads;
data errors name the file; failed runs leave no empty output dir; default output dirs differ per method;
the resume guard refuses changed settings before any evaluation; signals and exit codes.

``cli.main`` runs in-process (the 8 host devices of conftest), so each refused command costs
milliseconds. The checks that a model was never loaded patch ``run.load`` to fail loudly.
"""

import json
import signal

import pytest

from experiments.commonsense import cli
from experiments.commonsense import data as data_lib
from experiments.commonsense import run as run_lib

BRIEF = ["--tasks", "boolq", "--eval-limit", "4", "--eval-mode", "loglik", "--no-eval-before", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from experiments.commonsense import embedded

    root = tmp_path_factory.mktemp("cs_cache")
    embedded.ensure_embedded(embedded.EmbeddedSpec(seed=0), root)
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a run gets as far as loading the model."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(run_lib, "load", refuse)


def _main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(argv, capsys, *needles):
    code, out, err = _main(argv, capsys)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("flag,value,needle", [
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--lr", "-1", "--lr must be a finite number > 0, got -1"),
    ("--lr", "0", "--lr"),
    ("--epochs", "0", "--epochs"),
    ("--epochs", "nan", "--epochs"),
    ("--batch-size", "0", "--batch-size must be an integer >= 1"),
    ("--dropout", "1", "--dropout must be a finite number >= 0 and < 1"),
    ("--warmup-ratio", "1.5", "--warmup-ratio"),
    ("--weight-decay", "-0.1", "--weight-decay"),
    ("--alpha", "inf", "--alpha"),
    ("--max-steps", "-3", "--max-steps"),
    ("--cutoff-len", "1", "--cutoff-len"),
    ("--r", "abc", "--r"),
    ("--method", "dora", "--method"),
    ("--remat", "sometimes", "--remat must be auto or one of none, full"),
    ("--tasks", "boolq,mmlu", "mmlu"),
    ("--mesh", "4by2", "--mesh"),
    ("--k", "3", "--r (32) must be divisible by --k (3)"),
    ("--bogus", "1", "--bogus"),
])
def test_bad_values_are_refused_at_parse_time(flag, value, needle, capsys, no_model, tmp_path):
    out = tmp_path / "out"
    _refused(["--mesh", "1x1", "--output-dir", out, flag, value], capsys, needle)
    assert not out.exists()


def test_mesh_error_blames_the_batch_size_not_the_unset_micro_batch(capsys, no_model, tmp_path):
    line = _refused(["--mesh", "3x3", "--output-dir", tmp_path / "o"], capsys, "--batch-size", "3x3")
    assert "micro" not in line and "preset" in line  # the user never set --batch-size either
    line = _refused(["--mesh", "4x2", "--batch-size", "30", "--output-dir", tmp_path / "o"], capsys)
    assert "--batch-size 30 is not divisible by the data-parallel size 4" in line and "preset" not in line
    _refused(["--mesh", "2x2", "--micro-batch-size", "6", "--output-dir", tmp_path / "o"], capsys,
             "--batch-size (32) must be a multiple of --micro-batch-size (6)")
    _refused(["--mesh", "4x1", "--batch-size", "16", "--micro-batch-size", "2", "--output-dir", tmp_path / "o"],
             capsys, "--micro-batch-size 2 is not divisible by the data-parallel size 4")
    # unset micro-batch: chosen to fit the mesh (a multiple of dp dividing the batch)
    assert run_lib.config_lib.micro_batch_size(cli.parse(["--mesh", "3x1", "--batch-size", "48"])) == 24
    assert run_lib.config_lib.micro_batch_size(cli.parse(["--mesh", "4x2"])) == 32
    assert not (tmp_path / "o").exists()


def test_missing_files_are_named(capsys, no_model, tmp_path):
    out = tmp_path / "out"
    _refused(["--model", tmp_path / "nope", "--train-data", tmp_path / "t.json", "--eval-dir", tmp_path,
              "--output-dir", out], capsys, str(tmp_path / "t.json"))
    (tmp_path / "t.json").write_text("[]")
    _refused(["--model", tmp_path / "nope", "--train-data", tmp_path / "t.json", "--eval-dir", tmp_path,
              "--output-dir", out], capsys, "--model", str(tmp_path / "nope"))
    _refused(["--model", "./x", "--output-dir", out], capsys, "--train-data and --eval-dir")
    _refused(["--eval-dir", tmp_path / "missing", "--output-dir", out], capsys, str(tmp_path / "missing"))
    assert not out.exists()


@pytest.mark.parametrize("content,needle", [
    ('[{"instruction": "q", "output": "a"}, {"instruction": "q2", "out', "not valid JSON (truncated?)"),
    ("[]", "holds no records"),
    ('{"instruction": "q", "output": "a"}', "expected a JSON list"),
    ('[{"instruction": "q"}]', "record 0 lacks field(s) ['output']"),
    ('["just text"]', "record 0 is a str"),
])
def test_training_data_errors_name_the_file(content, needle, cache, capsys, no_model, tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text(content)
    out = tmp_path / "out"
    _refused(["--mesh", "1x1", "--cache-dir", cache, "--train-data", bad, "--output-dir", out], capsys,
             str(bad), needle)
    assert not out.exists()


def test_jsonl_and_eval_set_errors_name_the_file_and_line(cache, capsys, no_model, tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": \n')
    _refused(["--cache-dir", cache, "--train-data", bad, "--output-dir", tmp_path / "o"], capsys, f"{bad} line 2")
    ev = tmp_path / "ev"
    (ev / "boolq").mkdir(parents=True)
    (ev / "boolq" / "test.json").write_text('[{"instruction": "q", "output": "a", "answer": "true"}')
    _refused(["--cache-dir", cache, "--eval-dir", ev, "--tasks", "boolq", "--output-dir", tmp_path / "o"], capsys,
             str(ev / "boolq" / "test.json"), "not valid JSON")
    with pytest.raises(ValueError, match="record 1 has no 'answer'"):
        (ev / "boolq" / "test.json").write_text(json.dumps([{"instruction": "q", "output": "a", "answer": "true"},
                                                              {"instruction": "q", "output": "a"}]))
        data_lib.load_eval_sets(ev, ("boolq",))


def test_default_output_dir_includes_the_method():
    assert cli.parse([]).out_dir == "outputs/commonsense-gralora"
    assert cli.parse(["--method", "lora"]).out_dir == "outputs/commonsense-lora"
    assert cli.parse(["--method", "full"]).out_dir == "outputs/commonsense-full"
    assert cli.parse(["--output-dir", "x"]).out_dir == "x"


# ----------------------------------------------------------------------------- resume guard and signals


@pytest.fixture(scope="module")
def trained_dir(cache, tmp_path_factory):
    """A finished 2-step run (its checkpoint is what the resume tests continue)."""
    out = tmp_path_factory.mktemp("cs_guard") / "out"
    code = cli.main(["--mesh", "2x2", "--cache-dir", str(cache), "--output-dir", str(out), "--max-steps", "2",
                     "--batch-size", "16", *BRIEF])
    assert code == 0
    return out


def test_resume_guard_refuses_changed_settings_before_any_work(trained_dir, cache, capsys, no_model):
    base = ["--mesh", "2x2", "--cache-dir", cache, "--output-dir", trained_dir, "--batch-size", "16", *BRIEF]
    line = _refused([*base, "--max-steps", "2", "--lr", "0.001"], capsys, "--lr 0.005 in the checkpoint, 0.001 now")
    assert "cannot resume from step 2" in line and "--max-steps" not in line and len(line) < 400
    line = _refused([*base, "--max-steps", "3", "--cutoff-len", "64"], capsys, "--max-steps 2 in the checkpoint, 3 now",
                    "--cutoff-len 128 in the checkpoint, 64 now", "steps 2 in the checkpoint, 3 now")
    line = _refused(["--mesh", "2x2", "--cache-dir", cache, "--output-dir", trained_dir, "--batch-size", "32",
                     "--max-steps", "2", *BRIEF], capsys, "--batch-size 16 in the checkpoint, 32 now")
    _refused([*base, "--max-steps", "2", "--no-resume"], capsys, "--no-resume")


def test_same_settings_resume_without_retraining(trained_dir, cache, capsys):
    code, out, err = _main(["--mesh", "2x2", "--cache-dir", cache, "--output-dir", trained_dir, "--max-steps", "2",
                            "--batch-size", "16", *BRIEF], capsys)
    assert code == 0, err
    assert "resumed from step 2" in out
    assert json.loads((trained_dir / "results.json").read_text())["train"]["steps"] == 2


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_exit_codes(sig, code, cache, capsys, monkeypatch, tmp_path):
    real_next = data_lib.BatchIterator.__next__
    calls = {"n": 0}

    def interrupting_next(self):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(sig)
        return real_next(self)

    monkeypatch.setattr(data_lib.BatchIterator, "__next__", interrupting_next)
    out = tmp_path / "out"
    got, stdout, err = _main(["--mesh", "2x2", "--cache-dir", cache, "--output-dir", out, "--max-steps", "5",
                              "--batch-size", "16", *BRIEF], capsys)
    assert got == code, (stdout, err)
    assert "Traceback" not in stdout + err and not (out / "adapter").exists()
    if sig == signal.SIGTERM or (out / "checkpoints").exists():  # SIGINT saves once the trainer handles it
        res = json.loads((out / "results.json").read_text())
        assert res["train"]["stop_reason"] == {143: "sigterm", 130: "sigint"}[code]


def test_divergence_exits_1_and_exports_nothing(cache, capsys, tmp_path, monkeypatch):
    """A loss that turns NaN stops the run with exit 1 (nothing non-finite exported)."""
    import importlib

    import jax.numpy as jnp

    train_lib = importlib.import_module("gralora_jax.train")  # the module (the package re-exports a function `train`)

    real = train_lib.make_causal_lm_loss_fn

    def nan_loss(*a, **k):
        fn = real(*a, **k)

        def loss(params, batch, rng, train):
            value, metrics = fn(params, batch, rng, train)
            return value * jnp.nan, metrics

        loss.loss = fn.loss
        return loss

    monkeypatch.setattr(train_lib, "make_causal_lm_loss_fn", nan_loss)
    out = tmp_path / "out"
    code, stdout, err = _main(["--mesh", "1x1", "--cache-dir", cache, "--output-dir", out, "--max-steps", "3",
                               "--batch-size", "8", *BRIEF], capsys)
    assert code == 1, (stdout, err)
    assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (out / "adapter").exists()


def test_progress_lines_survive_a_closed_stdout(monkeypatch):
    # `python -m experiments.commonsense ... | tee log` and Ctrl-C: tee dies too; the run must still save
    import sys

    from experiments.commonsense import run as run_lib

    class Closed:
        def write(self, _):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    run_lib.log("trained to step 3")
    with pytest.raises(BrokenPipeError):
        print("x", flush=True)  # the control: the pipe really is closed
