"""Loading refuses what it should, with one line naming the file: remote code, shard names
that leave the checkpoint directory, JSON that is not an object, truncated or garbage
safetensors / GGUF / msgpack files. No torch needed: files are written with our own writer,
flax's msgpack and the gguf package."""

import builtins
import json
import pathlib
import re

import numpy as np
import pytest
import transformers

from gralora_jax.loading import (
    SafetensorsError,
    load_config,
    load_tokenizer,
    read_flax_msgpack,
    read_safetensors,
    write_safetensors,
    write_sharded_safetensors,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _one_line_naming(excinfo, path):
    msg = str(excinfo.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg


# ------------------------------------------------------------------------------ remote code

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture
def answer_yes(monkeypatch):
    """A user who answers "y" when transformers asks whether to run a checkpoint's code."""
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    return asked


def test_config_with_remote_code_is_refused_not_run(tmp_path, answer_yes):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil_config.py").write_text(EVIL.format(marker=str(marker)) + (
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "evil_config.EvilConfig"}}))
    with pytest.raises(ValueError, match="never runs") as e:
        load_config(str(tmp_path))
    _one_line_naming(e, tmp_path / "config.json")
    assert not marker.exists() and not answer_yes


def test_tokenizer_with_remote_code_is_refused_not_run(tmp_path, answer_yes):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil_tok.py").write_text(EVIL.format(marker=str(marker)) + (
        "from transformers import PreTrainedTokenizerFast\nclass EvilTok(PreTrainedTokenizerFast):\n    pass\n"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTok", "auto_map": {"AutoTokenizer": ["evil_tok.EvilTok", "evil_tok.EvilTok"]}}))
    with pytest.raises(ValueError, match="never runs"):
        load_tokenizer(str(tmp_path))
    assert not marker.exists() and not answer_yes


def test_every_auto_class_call_in_the_project_refuses_remote_code():
    """Static check: each ``Auto*.from_pretrained(`` call spells ``trust_remote_code=False``."""
    calls = []
    for d in ("gralora_jax", "experiments", "benchmarks", "scripts", "tpu_setup"):
        for f in (REPO / d).rglob("*.py"):
            text = f.read_text()
            for m in re.finditer(r"\bAuto\w+\.from_pretrained\(", text):
                depth, i = 1, m.end()
                while depth and i < len(text):
                    depth += {"(": 1, ")": -1}.get(text[i], 0)
                    i += 1
                calls.append((f"{f.relative_to(REPO)}:{text[:m.start()].count(chr(10)) + 1}", text[m.start():i]))
    assert calls, "no Auto*.from_pretrained calls found: the scan is broken"
    bad = [where for where, call in calls if "trust_remote_code=False" not in call]
    assert not bad, bad


# ------------------------------------------------------------------------------ sharded indexes


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/abs.safetensors", "sub/x.safetensors", ".."])
def test_safetensors_index_shards_stay_in_the_directory(tmp_path, shard):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_safetensors({"w": np.ones(2, np.float32)}, str(tmp_path / "outside.safetensors"))  # a real target
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(SafetensorsError, match="not a plain file name") as e:
        read_safetensors(ckpt)
    _one_line_naming(e, index)


def test_flax_index_shards_stay_in_the_directory(tmp_path):
    from flax.serialization import msgpack_serialize

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "outside.msgpack").write_bytes(msgpack_serialize({"x": np.ones(2, np.float32)}))
    index = ckpt / "flax_model.msgpack.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "../outside.msgpack"}}))
    with pytest.raises(ValueError, match="not a plain file name") as e:
        read_flax_msgpack(str(ckpt))
    _one_line_naming(e, index)


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("model.safetensors.index.json", "[]", "must be a JSON object, got a list"),
        ("model.safetensors.index.json", '{"weight_map": ["a"]}', "'weight_map' object"),
        ("model.safetensors.index.json", '{"weight_map": {"w": 3}}', "'weight_map' object"),
        ("model.safetensors.index.json", '{"weight_map": ', "not valid JSON"),
        ("flax_model.msgpack.index.json", "[1]", "must be a JSON object, got a list"),
        ("config.json", "[]", "must be a JSON object, got a list"),
        ("config.json", '{"model_type": 7}', "'model_type' must be a string"),
    ],
)
def test_malformed_json_files_are_named(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=needle) as e:
        if name == "config.json":
            load_config(str(tmp_path))
        elif name.startswith("flax"):
            read_flax_msgpack(str(tmp_path))
        else:
            read_safetensors(tmp_path)
    _one_line_naming(e, tmp_path / name)


def test_sharded_index_written_atomically_and_readable(tmp_path):
    sd = {f"w{i}": np.full((4,), i, np.float32) for i in range(3)}
    names = write_sharded_safetensors(sd, tmp_path, max_shard_bytes=16)
    assert len(names) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["model.safetensors.index.json"])
    got = read_safetensors(tmp_path)
    assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in sd.items()}


# ------------------------------------------------------------------------------ truncated / garbage files


def test_truncated_safetensors_names_the_file(tmp_path):
    f = tmp_path / "model.safetensors"
    write_safetensors({"a": np.ones((8, 8), np.float32), "b": np.ones(4, np.float32)}, str(f))
    data = f.read_bytes()
    for cut in (0, 5, 40, len(data) // 2, len(data) - 1):
        f.write_bytes(data[:cut])
        with pytest.raises(SafetensorsError, match="corrupt") as e:
            read_safetensors(f)
        _one_line_naming(e, f)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    w.add_tensor("output_norm.weight", np.ones((32,), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("cut", [0, 3, 10, 100, 0.5, -4])
def test_truncated_gguf_names_the_file(tmp_path, tiny_gguf, cut):
    from gralora_jax.loading import load_gguf_config

    n = int(len(tiny_gguf) * cut) if isinstance(cut, float) else cut % len(tiny_gguf) if cut < 0 else cut
    f = tmp_path / "cut.gguf"
    f.write_bytes(tiny_gguf[:n])
    with pytest.raises(ValueError, match="GGUF") as e:
        load_gguf_config(f)
    _one_line_naming(e, f)


@pytest.mark.parametrize("payload", [b"", b"\xc1garbage", b"\x93\x01\x02", "cut"], ids=["empty", "garbage", "list", "cut"])
def test_bad_flax_msgpack_names_the_file(tmp_path, payload):
    from flax.serialization import msgpack_serialize

    if payload == "cut":
        full = msgpack_serialize({"m": {"k": np.ones((16, 16), np.float32)}})
        payload = full[: len(full) // 2]
    f = tmp_path / "flax_model.msgpack"
    f.write_bytes(payload)
    with pytest.raises(ValueError, match="not a valid Flax msgpack checkpoint") as e:
        read_flax_msgpack(str(tmp_path))
    _one_line_naming(e, f)
