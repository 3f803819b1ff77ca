"""Read and write ``.safetensors`` files as numpy, bf16 included, without torch.

The format is small enough to parse directly, which is what this module does: an
8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}``),
then the raw little-endian tensor bytes (offsets are relative to the end of the
header). Parsing it ourselves means bf16 comes back as an ``ml_dtypes.bfloat16``
array (numpy itself has no bf16) and no torch import is needed.

Tensors are memory-mapped views (read-only) of the file, so opening a multi-GB
checkpoint costs nothing until a tensor is touched.

A checkpoint can be one file, a directory holding ``model.safetensors``, or a
directory with a sharded ``model.safetensors.index.json`` (``{"weight_map": {name:
shard file}}``), as written by ``transformers``' ``save_pretrained``.

>>> import tempfile, os, numpy as np
>>> d = tempfile.mkdtemp()
>>> write_safetensors({"w": np.ones((2, 3), np.float32)}, os.path.join(d, "model.safetensors"))
>>> read_safetensors(d)["w"].shape
(2, 3)
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from gralora_jax import fileio

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tag <-> numpy dtype (little-endian).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_TAGS = {v: k for k, v in _DTYPES.items()}

# Refuse absurd headers rather than trying to allocate them (safetensors uses 100 MB too).
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not valid safetensors, or a sharded checkpoint with a missing piece."""


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """``(tensor entries, metadata, data start offset)`` of one ``.safetensors`` file."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: corrupt safetensors header (file has only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: corrupt safetensors header (declared header length {n} does not fit "
                f"in a file of {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (JSON is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header entry {name!r}: {entry!r} ({e})") from None
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not (0 <= begin <= end <= data_len) or end - begin != want:
            raise SafetensorsError(
                f"{path}: corrupt safetensors header: tensor {name!r} ({entry['dtype']}{list(shape)}) "
                f"has data_offsets [{begin}, {end}] but needs {want} bytes within {data_len} data bytes"
            )
    return header, metadata, 8 + n


def read_safetensors_file(path: str | os.PathLike, *, copy: bool = False) -> dict[str, np.ndarray]:
    """All tensors of one file as numpy arrays (memory-mapped read-only views unless ``copy``)."""
    header, _, start = read_header(path)
    out: dict[str, np.ndarray] = {}
    if not header:
        return out
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    for name, e in header.items():
        dtype = _DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        shape = tuple(e["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(mm, dtype=dtype, count=count, offset=start + begin).reshape(shape)
        out[name] = arr.copy() if copy else arr
    return out


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``__metadata__`` string dict of one file (``{}`` when absent)."""
    return read_header(path)[1]


def resolve_checkpoint_files(path_or_dir: str | os.PathLike) -> dict[str, list[str]]:
    """``{file path: [tensor names expected in it]}`` for a file, a dir, or a sharded dir.

    For a single file the name lists are empty (everything in the file is wanted).
    Raises ``FileNotFoundError`` naming what is missing.
    """
    p = os.fspath(path_or_dir)
    if os.path.isfile(p):
        return {p: []}
    if not os.path.isdir(p):
        raise FileNotFoundError(f"no safetensors checkpoint at {p!r} (neither a file nor a directory)")
    single = os.path.join(p, SINGLE_FILE)
    index = os.path.join(p, INDEX_FILE)
    if os.path.isfile(single):
        return {single: []}
    if os.path.isfile(index):
        files: dict[str, list[str]] = {}
        for name, shard in read_weight_map(index, "safetensors index").items():
            files.setdefault(shard, []).append(name)
        missing = sorted(os.path.basename(f) for f in files if not os.path.isfile(f))
        if missing:
            raise FileNotFoundError(
                f"sharded checkpoint {p!r} is incomplete: missing shard file(s) {missing} "
                f"listed in {INDEX_FILE}"
            )
        return files
    others = sorted(f for f in os.listdir(p) if f.endswith(".safetensors"))
    if len(others) == 1:
        return {os.path.join(p, others[0]): []}
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {p!r}"
        + (f" (found {others}; pass one file explicitly)" if others else "")
    )


def read_weight_map(index_path: str | os.PathLike, what: str) -> dict[str, str]:
    """``{tensor name: shard file path}`` from a sharded checkpoint's index (safetensors or
    Flax msgpack; ``what`` names the kind in errors).

    Shard names must be plain file names inside the checkpoint directory: an absolute path,
    a ``..`` component or a sub-directory is refused (an index must not make the loader read
    files elsewhere). Errors are one line naming the index file.
    """
    index_path = os.fspath(index_path)
    try:
        weight_map = fileio.read_json_object(index_path, what).get("weight_map")
    except ValueError as e:
        raise SafetensorsError(str(e)) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafetensorsError(
            f"{index_path}: {what} needs a 'weight_map' object mapping tensor names to shard file names"
        )
    directory = os.path.dirname(index_path)
    for shard in set(weight_map.values()):
        if not _is_plain_file_name(shard):
            raise SafetensorsError(
                f"{index_path}: shard file name {shard!r} is not a plain file name in the checkpoint "
                f"directory (absolute paths, '..' and sub-directories are refused)"
            )
    return {name: os.path.join(directory, shard) for name, shard in weight_map.items()}


def _is_plain_file_name(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
        and os.path.basename(name) == name
    )


def read_safetensors(path_or_dir: str | os.PathLike, *, copy: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors checkpoint: a file, a dir, or a sharded dir.

    bf16 tensors come back as ``ml_dtypes.bfloat16`` arrays. For a sharded
    checkpoint, each tensor must be in the shard the index names.
    """
    out: dict[str, np.ndarray] = {}
    for file, names in resolve_checkpoint_files(path_or_dir).items():
        tensors = read_safetensors_file(file, copy=copy)
        if names:
            absent = sorted(set(names) - set(tensors))
            if absent:
                raise SafetensorsError(
                    f"{file}: the index lists {len(absent)} tensor(s) for this shard that it does not "
                    f"contain, e.g. {absent[:5]}"
                )
            tensors = {n: tensors[n] for n in names}
        for n in tensors:
            if n in out:
                raise SafetensorsError(f"tensor {n!r} appears in more than one shard of {path_or_dir!r}")
        out.update(tensors)
    return out


def _np(x) -> np.ndarray:
    """Any array-like (numpy, jax, torch on CPU) -> contiguous little-endian numpy."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
        else:
            x = x.numpy()
    a = np.ascontiguousarray(np.asarray(x))
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def write_safetensors(
    state_dict: Mapping[str, object], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``{name: array}`` as one ``.safetensors`` file (bf16 via ml_dtypes is kept as BF16).

    The file is written atomically (:func:`gralora_jax.fileio.atomic_open`): an interrupted
    write leaves the previous file, never a truncated one. ``metadata`` values must be strings (the format's rule); transformers expects
    ``{"format": "pt"}`` on PyTorch checkpoints, which is the default.
    """
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
    arrays = {str(k): _np(v) for k, v in state_dict.items()}
    header: dict[str, object] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name, a in arrays.items():
        tag = _TAGS.get(np.dtype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a.dtype)
        if tag is None:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent")
        header[name] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    with fileio.atomic_open(path) as f:  # readers never see a half-written file
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays.values():
            f.write(a.tobytes())


def write_sharded_safetensors(
    state_dict: Mapping[str, object],
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``state_dict`` as ``model-0000i-of-0000n.safetensors`` shards plus the index.

    Every file is written atomically (temporary file + rename), the index after the shards.
    Tensors fill shards in order; a shard is closed when the next tensor would push
    it past ``max_shard_bytes`` (one oversized tensor gets a shard of its own).
    Returns the shard file names. With a single shard it still writes the index form.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    os.makedirs(directory, exist_ok=True)
    arrays = {k: _np(v) for k, v in state_dict.items()}
    groups: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for name, a in arrays.items():
        if groups[-1] and used + a.nbytes > max_shard_bytes:
            groups.append({})
            used = 0
        groups[-1][name] = a
        used += a.nbytes
    n = len(groups)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for fname, group in zip(names, groups):
        write_safetensors(group, os.path.join(directory, fname), metadata)
        weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in arrays.values()))}, "weight_map": weight_map}
    # The index last: it names only shards that are complete.
    fileio.atomic_write_text(os.path.join(directory, INDEX_FILE), json.dumps(index, indent=2, sort_keys=True))
    return names
