"""One method's training step on transformers' own Flax Llama, timed: ``run_hf(...) -> dict``.

The ``hf_`` methods (``hf_frozen``, ``hf_lora``, ``hf_gralora4``, ...) answer "how fast is our
model code against transformers' ``FlaxLlamaForCausalLM`` under the *same* GraLoRA surgery,
optimizer and train step". Only the model differs from :func:`benchmarks.jax_step.run_jax`:

* the model is ``FlaxLlamaForCausalLM(LlamaConfig(...shape...), dtype=bfloat16, _do_init=False)``
  (transformers 4.x; transformers 5 has no Flax, see ``--hf-pythonpath`` in
  :mod:`benchmarks.train_throughput`). ``_do_init=False`` only traces ``init`` abstractly
  (``jax.eval_shape``) for the parameter shapes, nothing is compiled or allocated;
* its weights are drawn by :func:`benchmarks.jax_step.random_params` on that shape tree cast to
  bfloat16, so at the same seed and an untied shape they equal ours leaf for leaf;
* everything after that is shared code: :func:`~benchmarks.jax_step.apply_method`
  (``get_gralora_model``), :func:`~benchmarks.jax_step.make_loss_fn`,
  :func:`~benchmarks.jax_step.time_method` (``make_optimizer``, ``make_train_step``,
  ``init_train_state``, compile and step timing), so the result has the same keys as ``run_jax``.

Known differences of transformers' FlaxLlama (4.57.6), none of which changes the counted FLOPs:

* it ignores ``tie_word_embeddings``: its tree always has an ``lm_head/kernel``, so at a tied shape
  (1b) the hf model holds (frozen) one more ``hidden x vocab`` matrix than ours;
* it hard-codes rotary base 10000 (the shape's ``rope_theta`` is ignored; cost is the same);
* attention materialises the float32 ``[B, heads, T, T]`` weights (no flash kernel; ``--attn``
  is ours only and refused here), and there is no gradient checkpointing, so ``remat`` other
  than ``"none"`` is refused;
* ``max_position_embeddings`` is set to ``max(seq, 2 * head_dim)``: each attention layer builds a
  ``[max_pos, max_pos]`` causal mask and a ``[max_pos, head_dim]`` rotary table, which at the
  shape's 131072 positions would be 16 GiB per layer; only the first ``seq`` positions are used.
  (Its ``create_sinusoidal_positions`` cuts the table's last axis, of length ``2 * head_dim``, to
  ``max_pos``, hence the lower bound.)
* on a mesh other than ``1x1`` its parameters and batch are placed by our llama sharding rules
  (same paths as ours) and XLA propagates the rest; FlaxLlama itself has no sharding constraints.
* ``loss="chunked"`` takes the final (normed) hidden state from ``output_hidden_states`` (the
  unused logits are dead code under jit) and multiplies by ``lm_head/kernel``.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.jax_step import bench_mesh, build_and_time
from benchmarks.shapes import Method, Shape, hf_unsupported

HF_HINT = (
    "the hf_ methods need transformers 4.x with Flax (FlaxLlamaForCausalLM; tested with 4.57.6, "
    "transformers 5 dropped Flax): install it into a folder and pass --hf-pythonpath DIR "
    "(or set BENCH_HF_PYTHONPATH)"
)


def import_flax_llama():
    """``(transformers module, FlaxLlamaForCausalLM, LlamaConfig)``; a clear ImportError otherwise."""
    try:
        import transformers
        from transformers import FlaxLlamaForCausalLM, LlamaConfig
    except ImportError as e:
        raise ImportError(f"{HF_HINT}; import failed: {e}") from e
    return transformers, FlaxLlamaForCausalLM, LlamaConfig


def hf_config_kwargs(shape: Shape, seq: int) -> dict:
    """``LlamaConfig`` keyword arguments for ``shape`` with ``max_position_embeddings =
    max(seq, 2 * head_dim)`` (see the module docstring for why).

    >>> from benchmarks.shapes import SHAPES
    >>> hf_config_kwargs(SHAPES["1b"], 1024)["max_position_embeddings"], hf_config_kwargs(SHAPES["tiny"], 16)["max_position_embeddings"]
    (1024, 32)
    """
    if seq < 1:
        raise ValueError(f"seq must be positive, got {seq}")
    return {**shape.hf_config_kwargs(), "max_position_embeddings": max(seq, 2 * shape.head_dim)}


def build_hf_model(shape: Shape, seq: int, dtype=jnp.bfloat16):
    """Uninitialised ``FlaxLlamaForCausalLM`` of ``shape`` (bf16 compute)."""
    _, FlaxLlamaForCausalLM, LlamaConfig = import_flax_llama()
    return FlaxLlamaForCausalLM(LlamaConfig(**hf_config_kwargs(shape, seq)), dtype=dtype, _do_init=False)


def bf16_shape_tree(model) -> object:
    """An object whose ``params_shape_tree`` is ``model``'s, every leaf as bfloat16, for
    :func:`benchmarks.jax_step.random_params` (FlaxLlama declares float32 parameters)."""
    tree = model.params_shape_tree
    tree = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), dict(tree))

    class _Shapes:
        params_shape_tree = tree

    return _Shapes()


def check_hf_options(*, remat: str, attn: Optional[str]) -> None:
    """Refuse options that transformers' FlaxLlama cannot honour (see the module docstring)."""
    why = hf_unsupported(remat, attn)
    if why:
        raise ValueError(why)


def run_hf(
    shape: Shape,
    method: Method,
    *,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    remat: str = "none",
    mesh: str = "1x1",
    loss: str = "full",
    attn: Optional[str] = None,
    layout: Optional[str] = None,
    seed: int = 0,
    profile_dir: Optional[str] = None,
) -> dict:
    """Time ``method`` on transformers' FlaxLlama; same arguments and result keys as ``run_jax``
    (plus ``versions["transformers"]`` and ``hf_notes``)."""
    check_hf_options(remat=remat, attn=attn)
    transformers, _, _ = import_flax_llama()
    t_setup = time.perf_counter()
    mesh_ = bench_mesh(mesh)
    phases = {}
    t_phase = time.perf_counter()
    model = build_hf_model(shape, seq)
    phases["build_model"] = time.perf_counter() - t_phase
    shapes_ = bf16_shape_tree(model)
    res = build_and_time(
        model, shapes_, shape, method, mesh_,
        hidden=lambda forward: (lambda p, ids: forward(ids, params=p, output_hidden_states=True).hidden_states[-1]),
        head_kernel=lambda p: p["lm_head"]["kernel"], batch=batch, seq=seq, steps=steps, warmup=warmup, loss=loss,
        layout=layout, seed=seed, profile_dir=profile_dir, t_setup=t_setup, phases=phases)
    res["versions"]["transformers"] = transformers.__version__
    res["versions"]["transformers_dir"] = os.path.dirname(transformers.__file__)  # did --hf-pythonpath apply?
    res["hf_notes"] = "FlaxLlamaForCausalLM: untied lm_head, rope base 10000, max_position_embeddings=max(seq, 2*head_dim)"
    res["hf_base_params"] = int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes_.params_shape_tree)))
    return res
