"""Benchmark shapes, method names and the FLOP count behind MFU.

Shapes are the published architectures with random weights (no download):

>>> SHAPES["1b"].hidden, SHAPES["1b"].layers, SHAPES["1b"].vocab
(2048, 16, 128256)

A *method* is a short name parsed by :func:`parse_method`:

* ``frozen``         forward pass + loss only (no gradient): the floor every method pays
* ``full``           full fine-tuning (every base weight trains, AdamW)
* ``lora``           LoRA, rank ``--rank`` (64), ``lora_alpha = --alpha`` (128)
* ``gralora<k>``     GraLoRA with ``gralora_k = k``, ``r = --rank``, ``alpha = --alpha``
* ``gralora<k>h<h>`` Hybrid GraLoRA: ``r = rank - h`` block rank plus a shared rank-``h`` LoRA,
  so the trainable parameter count equals LoRA of rank ``--rank``
* a ``peft_`` prefix (``peft_lora``, ``peft_gralora4``) runs the same method in PyTorch + PEFT.
* an ``hf_`` prefix (``hf_frozen``, ``hf_lora``, ``hf_gralora4``, ``hf_full``) runs the same method
  on transformers' own ``FlaxLlamaForCausalLM`` (jax, same surgery, optimizer and train step as
  ours; backend ``"hf"``, see :mod:`benchmarks.hf_flax_step`). Same model FLOPs as without the prefix.

>>> parse_method("gralora4h16", rank=64, alpha=128)
Method(name='gralora4h16', kind='gralora', r=48, k=4, hybrid_r=16, alpha=128, backend='jax')

FLOPs (per token, "model FLOPs": rematerialisation is not counted), with ``N_lin`` the
parameters of the seven decoder projections over all layers, ``N_head = hidden * vocab``
(the output projection, tied or not), ``d_attn = heads * head_dim``, ``T`` the sequence
length, ``L`` the layers and ``N_ad`` the adapter parameters (``(r + hybrid_r) * (in + out)``
summed over adapted projections; GraLoRA does exactly LoRA's arithmetic):

* matmul forward: ``F = 2 * (N_lin + N_head) + 4 * L * T * d_attn``
  (attention ``QK^T`` and ``PV`` over the full ``T x T`` square, the PaLM convention, although
  the causal mask makes half of it skippable)
* frozen forward: ``F``
* full fine-tuning: ``3 * F`` (forward, input gradients, weight gradients)
* adapter training: ``2 * F + 6 * N_ad`` (forward and input gradients through the frozen base,
  no weight gradients for frozen weights; the adapter's own forward, input-gradient and
  weight-gradient matmuls are ``2 * N_ad`` each)

Embedding lookups, norms, rotary, softmax, the loss and the optimizer are not counted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str  # short name used on the command line
    reference: str  # the public model whose architecture this is
    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    ffn: int  # intermediate_size
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings
    rope_theta: float = 500000.0  # rope base (does not change the cost)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """``name -> (in, out)`` of the seven adapted projections of one layer."""
        d, kv, f = self.hidden, self.kv_heads * self.head_dim, self.ffn
        return {
            "q_proj": (d, self.heads * self.head_dim),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (self.heads * self.head_dim, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    @property
    def n_linear(self) -> int:
        """Parameters of the decoder projections, all layers."""
        return self.layers * sum(i * o for i, o in self.projection_shapes().values())

    @property
    def n_head(self) -> int:
        return self.hidden * self.vocab

    @property
    def n_params(self) -> int:
        """All base parameters (embedding, projections, norms, untied head)."""
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.vocab * self.hidden + self.n_linear + norms + (0 if self.tied else self.n_head)

    def hf_config_kwargs(self) -> dict:
        """Keyword arguments of ``transformers.LlamaConfig`` for this shape."""
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            tie_word_embeddings=self.tied,
            rope_theta=self.rope_theta,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            hidden_act="silu",
        )


SHAPES: dict[str, Shape] = {
    "tiny": Shape("tiny", "test shape", 64, 2, 4, 2, 128, 256, False, 10000.0),
    "135m": Shape("135m", "SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True, 100000.0),
    "1b": Shape("1b", "Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True),
    "8b": Shape("8b", "Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False),
}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # as given on the command line
    kind: str  # "frozen" | "full" | "lora" | "gralora"
    r: int = 0  # LoRA rank / GraLoRA block rank r (PEFT's r)
    k: int = 1  # gralora_k
    hybrid_r: int = 0  # GraLoRA hybrid rank
    alpha: float = 0.0  # lora_alpha / GraLoRA alpha
    backend: str = "jax"  # "jax" (ours), "peft" (PyTorch + PEFT) or "hf" (transformers' FlaxLlama)

    @property
    def trains_adapters(self) -> bool:
        return self.kind in ("lora", "gralora")

    @property
    def total_rank(self) -> int:
        return self.r + self.hybrid_r


_GRALORA = re.compile(r"^gralora(\d+)(?:h(\d+))?$")
_BACKEND_PREFIXES = {"peft_": "peft", "hf_": "hf"}  # name prefix -> backend


def parse_method(name: str, *, rank: int = 64, alpha: float = 128) -> Method:
    """See the module docstring for the names.

    >>> parse_method("hf_lora", rank=8, alpha=16)
    Method(name='hf_lora', kind='lora', r=8, k=1, hybrid_r=0, alpha=16, backend='hf')
    """
    backend = "jax"
    base = name
    for prefix, b in _BACKEND_PREFIXES.items():
        if name.startswith(prefix):
            backend, base = b, name[len(prefix):]
            break
    if base in ("frozen", "full"):
        if backend == "peft" and base == "full":
            raise ValueError("peft_full is not a PEFT method; use 'full' (ours)")
        return Method(name, base, backend=backend)
    if base == "lora":
        return Method(name, "lora", r=rank, alpha=alpha, backend=backend)
    m = _GRALORA.match(base)
    if m:
        k, h = int(m.group(1)), int(m.group(2) or 0)
        if h >= rank:
            raise ValueError(f"{name}: hybrid rank {h} must be smaller than --rank {rank}")
        r = rank - h
        if k <= 0 or r % k:
            raise ValueError(f"{name}: block rank {r} must be divisible by k={k}")
        return Method(name, "gralora", r=r, k=k, hybrid_r=h, alpha=alpha, backend=backend)
    raise ValueError(
        f"unknown method {name!r}: use frozen, full, lora, gralora<k>, gralora<k>h<h>, optionally prefixed by peft_ or hf_"
    )


def hf_unsupported(remat: str, attn: Optional[str]) -> Optional[str]:
    """Why transformers' FlaxLlama (the ``hf_`` methods) cannot run with these options, or None.

    Kept free of jax so that the benchmark's parent process can check without importing it.

    >>> hf_unsupported("none", None) is None, hf_unsupported("full", None)[:12]
    (True, "remat='full'")
    """
    if remat != "none":
        return (f"remat={remat!r}: transformers' FlaxLlamaForCausalLM (4.57.6) has no gradient checkpointing "
                "option; run the hf_ methods with --remat none")
    if attn is not None:
        return f"attn={attn!r} selects our attention only; FlaxLlama has its own (use no --attn)"
    return None


def adapter_params(shape: Shape, method: Method) -> int:
    if not method.trains_adapters:
        return 0
    return shape.layers * sum(method.total_rank * (i + o) for i, o in shape.projection_shapes().values())


def forward_flops_per_token(shape: Shape, seq: int) -> float:
    """Matmul FLOPs of one token's forward pass through the base model (no adapters)."""
    return 2.0 * (shape.n_linear + shape.n_head) + 4.0 * shape.layers * seq * shape.heads * shape.head_dim


def train_flops_per_token(shape: Shape, seq: int, method: Method) -> float:
    """Model FLOPs of one token of one step of ``method`` (see the module docstring)."""
    f = forward_flops_per_token(shape, seq)
    if method.kind == "frozen":
        return f
    if method.kind == "full":
        return 3.0 * f
    return 2.0 * f + 6.0 * adapter_params(shape, method)


def trainable_params(shape: Shape, method: Method) -> int:
    if method.kind == "full":
        return shape.n_params
    return adapter_params(shape, method)


# H200 SXM dense bf16 peak by the datasheet (989.4 TFLOP/s, no sparsity). MFU is reported
# against it; the matmul ceiling measured in the same run is reported beside it.
H200_BF16_PEAK = 989.4e12


def default_peak(device_kind: Optional[str]) -> float:
    """Peak FLOP/s used for MFU: the H200/H100 datasheet bf16 rate, 1 TFLOP/s elsewhere (CPU runs)."""
    if device_kind and ("H200" in device_kind or "H100" in device_kind):
        return H200_BF16_PEAK
    return 1e12
