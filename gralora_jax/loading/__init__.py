"""Base-checkpoint loading: safetensors (single/sharded, bf16), HF Flax msgpack, GGUF.

Sub-modules, one job each:

* :mod:`.safetensors_io` -- read/write the safetensors format as numpy, no torch.
* :mod:`.convert` -- HF PyTorch state dict <-> Flax param tree, driven by the target shapes.
* :mod:`.pretrained` -- ``load_pretrained(dir | hub id | .gguf)`` -> ``(model, params)``.
* :mod:`.gguf_io` -- llama.cpp GGUF (llama, qwen3, gemma3) -> HF config, state dict, tokenizer.
* :mod:`.sharded` -- ``load_pretrained_sharded(path, mesh)``: each device reads only its shard.
"""

from gralora_jax.loading.convert import flax_to_torch_state_dict, match_flax_params, torch_to_flax_params
from gralora_jax.loading.gguf_io import load_gguf, load_gguf_config, load_gguf_tokenizer
from gralora_jax.loading.pretrained import (
    build_model,
    load_config,
    load_params,
    load_pretrained,
    load_tokenizer,
    param_shapes,
    read_flax_msgpack,
)
from gralora_jax.loading.sharded import load_pretrained_sharded
from gralora_jax.loading.safetensors_io import (
    SafetensorsError,
    read_metadata,
    read_safetensors,
    read_safetensors_file,
    write_safetensors,
    write_sharded_safetensors,
)

__all__ = [
    "SafetensorsError",
    "build_model",
    "flax_to_torch_state_dict",
    "load_config",
    "load_gguf",
    "load_gguf_config",
    "load_gguf_tokenizer",
    "load_params",
    "load_pretrained",
    "load_pretrained_sharded",
    "load_tokenizer",
    "match_flax_params",
    "param_shapes",
    "read_flax_msgpack",
    "read_metadata",
    "read_safetensors",
    "read_safetensors_file",
    "torch_to_flax_params",
    "write_safetensors",
    "write_sharded_safetensors",
]
