"""Tests for gralora_jax.fileio: atomic replace, scheme-preserving paths, no temp files left."""

import os

import pytest

from gralora_jax import fileio


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    fileio.atomic_write_bytes(target, b"old")
    fileio.atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert sorted(os.listdir(tmp_path / "sub")) == ["f.bin"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    fileio.atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.json"]


@pytest.mark.parametrize("path", ["gs://bucket/run", "gs://bucket/run/", "s3://b/x/y"])
def test_remote_paths_keep_scheme(path):
    assert fileio.is_remote(path)
    joined = fileio.join(path, "checkpoints", "1")
    assert joined.startswith(path.split("://")[0] + "://")
    assert "//" not in joined.split("://", 1)[1]
    assert fileio.path_str(path).rstrip("/") == path.rstrip("/")


def test_local_paths(tmp_path):
    assert not fileio.is_remote(tmp_path)
    assert fileio.join(tmp_path, "a", "b") == os.path.join(str(tmp_path), "a", "b")


def test_written_files_get_the_usual_mode_not_mkstemps(tmp_path):
    old = os.umask(0o022)
    try:
        fileio.atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.json").st_mode & 0o777) == 0o644
