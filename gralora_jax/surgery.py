"""Parameter-tree surgery: put GraLoRA (or LoRA) adapters into an unmodified Flax model.

Two steps, neither of which edits the model's source:

1. **Insert leaves.** Walk the model's params; every linear module (a dict with a 2-D
   ``kernel``) whose dotted path matches the config's targets gets adapter leaves beside its
   kernel::

       before: model/layers/0/self_attn/q_proj/{kernel}
       after:  model/layers/0/self_attn/q_proj/{kernel, gralora_A, gralora_B}

   A kernel is ``[in, out]`` (``nn.Dense``) unless the family table says the model type stores
   it ``[out, in]`` (GPT-2's ``FlaxConv1D``, :func:`gralora_jax.families.kernel_layout`).

2. **Route calls.** While the model runs, ``flax.linen.intercept_methods`` sees every
   ``nn.Dense`` (and transformers' ``FlaxConv1D``) call; when the called module's own params
   hold adapter leaves, the interceptor adds :func:`gralora_jax.layers.adapter_output` to the
   base result. Which modules are adapted is therefore read from the tree itself, so the
   tree stays the single source of truth (train masks, sharding and PEFT keys all derive from
   the same paths).

Scanned models (``scan_layers=True``: ``model/layers/scan/...`` kernels ``[L, in, out]``) get
stacked adapters (``gralora_A [L, k, in/k, r]``, ...). Targets are matched against the unrolled
names (``model.layers.<i>.self_attn.q_proj``) as PEFT does, and every adapter is drawn from a
generator seeded by the rng and its unrolled module name, so scanned and unrolled surgery with
the same rng give the same adapters. ``nn.scan`` hands each step its layer's slice, so the
interceptor sees 2-D kernels and 3-D GraLoRA leaves either way.

No silent no-ops: every traced call of the wrapped model's root module checks that each module
holding adapter leaves went through the interceptor, and raises otherwise (a model that calls
a layer some other way would return the base model's outputs with zero adapter gradients).

>>> # model = transformers.FlaxLlamaForCausalLM(...)
>>> # gmodel = get_gralora_model(model, GraLoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
>>> # logits = gmodel(input_ids).logits ; gmodel.save_pretrained("out/adapter")
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import os
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from gralora_jax import families, kinds, layers, peft_io
from gralora_jax import tree as tree_lib
from gralora_jax.config import AdapterConfig
from gralora_jax.families import IN_OUT, OUT_IN
from gralora_jax.models import layout as layout_lib
from gralora_jax.models.constraints import batch_pinned, embedded
from gralora_jax.sharding import TOKEN_EMBEDDINGS
from gralora_jax.targets import default_target_modules, select_targets

_CONV1D_CLASS_NAMES = ("FlaxConv1D",)  # transformers' GPT-2 projection, kernel stored [out, in]


def _unfreeze(params) -> dict:
    return tree_lib.unflatten(tree_lib.flatten(params))


def _linear_modules(params) -> dict[str, tuple[int, ...]]:
    flat = tree_lib.flatten(params)
    return {p[: -len("/kernel")]: tuple(np.shape(v)) for p, v in flat.items() if p.endswith("/kernel")}


def _host_generator(rng: jax.Array, name: str = "") -> np.random.Generator:
    """A numpy generator determined by a jax PRNG key (raw uint32 keys and typed keys) and a
    module name (its unrolled dotted path), so each adapter's draw depends on nothing else:
    not the order modules are visited in, nor whether the layers are scanned."""
    try:
        data = jax.random.key_data(rng)
    except (TypeError, ValueError):
        data = rng
    seed = np.asarray(data, dtype=np.uint32).ravel().tolist()
    if name:
        seed += np.frombuffer(hashlib.sha256(name.encode()).digest()[:16], dtype=np.uint32).tolist()
    return np.random.default_rng(seed)


def _module_names(linear: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, Optional[int]]]:
    """Dotted module name as PEFT sees it -> (tree path, layer index within a scanned kernel or None).

    A scanned module ``model/layers/scan/mlp/up_proj`` with kernel ``[L, in, out]`` stands for the
    L names ``model.layers.<i>.mlp.up_proj``."""
    out = {}
    for path, shape in linear.items():
        if layout_lib.is_scanned_path(path):
            for i in range(shape[0]):
                out[layout_lib.layer_path(path, i).replace("/", ".")] = (path, i)
        else:
            out[path.replace("/", ".")] = (path, None)
    return out


def add_adapters(
    params: Mapping[str, Any],
    config: AdapterConfig,
    rng: jax.Array,
    *,
    layouts: Optional[Mapping[str, str]] = None,
    adapter_dtype=jnp.float32,
) -> tuple[dict, list[str]]:
    """Pure surgery: ``params`` with adapter leaves inserted beside each targeted kernel.

    Returns ``(new_params, adapted module paths)``. ``layouts`` maps module path -> ``"in_out"``
    (``nn.Dense``) or ``"out_in"`` (GPT-2's ``FlaxConv1D``); unknown paths are ``"in_out"``.
    Errors: targets matching nothing (listing the module names that exist), a targeted module
    that is not a linear layer, shapes not divisible by ``gralora_k``.
    """
    kind = kinds.kind_of(config)
    params = _unfreeze(params)
    if any(tree_lib.is_adapter_path(p) for p in tree_lib.flatten(params)):
        raise ValueError("params already hold adapter leaves; merge_and_unload() or strip them first")
    linear = _linear_modules(params)
    dotted = _module_names(linear)
    # modules that are not linear (embeddings, norms) must be rejected when targeted explicitly
    if isinstance(config.target_modules, (tuple, list)):
        others = {p.rsplit("/", 1)[0] for p in tree_lib.flatten(params)} - set(linear)
        for o in sorted(others):
            od = o.replace("/", ".")
            if any(od == t or od.endswith("." + t) for t in config.target_modules):
                leaves = sorted(k for k in tree_lib.flatten(params) if k.startswith(o + "/"))
                raise TypeError(
                    f"target module {od!r} is not supported: only linear layers (nn.Dense, Conv1D) can be "
                    f"adapted, and it holds {[l.rsplit('/', 1)[-1] for l in leaves]}"
                )
    chosen = select_targets(dotted, config.target_modules, config.layers_to_transform, config.layers_pattern)
    names: dict[str, list[str]] = {}  # module path -> the dotted names chosen (one per layer when scanned)
    for d in chosen:
        names.setdefault(dotted[d][0], []).append(d)
    specs = []  # (module path, dotted names, in_features, out_features)
    for path, ds in names.items():
        shape = linear[path]
        scanned = layout_lib.is_scanned_path(path)
        if scanned:
            if len(ds) != shape[0]:
                layers_chosen = sorted(dotted[d][1] for d in ds)
                raise ValueError(
                    f"{path}: the targets select layers {layers_chosen} of {shape[0]}, but a scanned model "
                    "(scan_layers=True) adapts a module in every layer or none. Use the unrolled model "
                    "(scan_layers=False) for layers_to_transform / per-layer targets"
                )
            ds = sorted(ds, key=lambda d: dotted[d][1])
            shape = shape[1:]
        if len(shape) != 2:
            raise TypeError(f"target module {ds[0]!r} is not supported: kernel of rank {len(shape)} (only 2-D linear kernels)")
        layout = (layouts or {}).get(path, IN_OUT)
        in_f, out_f = shape if layout == IN_OUT else shape[::-1]
        kind.check_shape(config, in_f, out_f)
        specs.append((path, ds if scanned else None, in_f, out_f))

    flat = tree_lib.flatten(params)
    adapted = []
    for path, per_layer, in_f, out_f in specs:
        if per_layer is None:
            leaves = kinds.init_on_host(_host_generator(rng, path.replace("/", ".")), config, in_f, out_f, adapter_dtype)
        else:  # the unrolled model's adapters, stacked
            drawn = [kinds.init_on_host(_host_generator(rng, d), config, in_f, out_f, adapter_dtype) for d in per_layer]
            leaves = {n: jnp.stack([a[n] for a in drawn]) for n in drawn[0]}
        for name, v in leaves.items():
            flat[f"{path}/{name}"] = v
        adapted.append(path)
    return tree_lib.unflatten(flat), adapted


class _Visits:
    """Which adapted modules the interceptor applied, per traced call of the root module.

    A root ``__call__`` (scope path ``()``) opens a frame; every adapter applied inside it is
    recorded; when it returns, each module of the bound params that holds adapter leaves must
    have been recorded (except ``may_skip``), else the call raises. Only traces do Python work,
    so a jit cache hit costs nothing and checks nothing (its trace was checked). ``roots``
    counts the root calls seen, so a model that never runs a flax module under the interceptor
    is caught too.
    """

    def __init__(self, may_skip=()):
        self.frames: list[set] = []
        self.may_skip = frozenset(may_skip)  # module paths allowed to stay unvisited (lm_head without logits)
        self.roots = 0

    def root_call(self, module, call):
        self.frames.append(set())
        try:
            out = call()
        finally:
            seen = self.frames.pop()
        self.roots += 1
        expected = tree_lib.adapted_modules(module.variables.get("params", {}))
        missing = [m for m in expected if m not in seen and m not in self.may_skip]
        if missing:
            raise RuntimeError(
                f"{len(missing)} adapted module(s) were not called through the GraLoRA interceptor during "
                f"{type(module).__name__}.__call__, so their adapters would be silently ignored: "
                f"{missing[:6]}{' ...' if len(missing) > 6 else ''}. Adapted layers must be flax nn.Dense / "
                "FlaxConv1D modules called with __call__ inside GraLoRAModel (or its intercept() context)"
            )
        return out

    def applied(self, module) -> None:
        if self.frames:
            self.frames[-1].add("/".join(module.scope.path))


def _interceptor(config: AdapterConfig, train: bool, block_layout: str = layers.DEFAULT_BLOCK_LAYOUT,
                 visits: Optional[_Visits] = None, layouts: Optional[Mapping[str, str]] = None) -> Callable:
    """The interceptor adding adapters to Dense calls; ``layouts`` (module path -> kernel layout) is
    checked against the called module's class, so a family-table entry that is wrong raises."""
    visits = _Visits() if visits is None else visits
    layouts = layouts or {}
    kind = kinds.kind_of(config)
    scaling, dropout_rate = config.scaling, config.dropout

    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if not m.scope.path:
            return visits.root_call(m, lambda: next_fun(*args, **kwargs))
        names = [n for n in kind.leaves if m.has_variable("params", n)]
        if not names:
            out = next_fun(*args, **kwargs)
            return embedded(out) if isinstance(m, nn.Embed) and m.name in TOKEN_EMBEDDINGS else out
        path, conv1d = "/".join(m.scope.path), type(m).__name__ in _CONV1D_CLASS_NAMES
        if not (isinstance(m, nn.Dense) or conv1d):
            raise TypeError(
                f"module {path} of type {type(m).__name__} holds adapter leaves but only "
                "nn.Dense and FlaxConv1D can be adapted"
            )
        if conv1d != (layouts.get(path, IN_OUT) == OUT_IN):
            raise TypeError(f"module {path} is a {type(m).__name__} but its kernel layout is taken as "
                            f"{layouts.get(path, IN_OUT)!r}: fix out_in_kernels in gralora_jax.families")
        # with a mesh in context, batch over the data axes (gralora_jax.models.constraints): else on a
        # pure-FSDP mesh the input can arrive hidden-split, which GraLoRA's block reshape cannot take
        x = batch_pinned(args[0] if args else kwargs["inputs"])
        y = next_fun(x, *args[1:], **kwargs) if args else next_fun(*args, **{**kwargs, "inputs": x})
        visits.applied(m)
        adapter = {n: m.get_variable("params", n) for n in names}
        rng = None
        if train and dropout_rate > 0.0:
            if not m.has_rng("dropout"):
                raise ValueError("adapter dropout is on and train=True, but no dropout_rng was given")
            rng = m.make_rng("dropout")
        delta = kind.apply(x, adapter, scaling, dropout_rate=dropout_rate, dropout_rng=rng, block_layout=block_layout)
        return kind.add_output(y, delta)

    return intercept


def _check_block_layout(block_layout: str) -> str:
    if block_layout not in layers.BLOCK_LAYOUTS:
        raise ValueError(f"block_layout must be one of {layers.BLOCK_LAYOUTS}, got {block_layout!r}")
    return block_layout


class GraLoRAModel:
    """A Flax model plus a params tree holding adapters; PEFT-like methods.

    Construct with :func:`get_gralora_model` or :meth:`from_pretrained`.
    """

    def __init__(self, model, config: AdapterConfig, params: Mapping[str, Any], layouts: Mapping[str, str],
                 block_layout: str = layers.DEFAULT_BLOCK_LAYOUT):
        self.model = model
        self.config = config
        self.params = params
        self.layouts = dict(layouts)  # kernel layout per adapted module (in_out / out_in)
        self.block_layout = _check_block_layout(block_layout)  # layers.gralora_blocks layout

    # ------------------------------------------------------------------ running
    @property
    def scaling(self) -> float:
        return self.config.scaling

    @contextlib.contextmanager
    def intercept(self, train: bool = False, *, may_skip=(), _visits: Optional[_Visits] = None):
        """Context in which the wrapped model's Dense calls add their adapters.

        Each traced call of the model's root module inside it raises ``RuntimeError`` when a
        module holding adapter leaves was not called through the interceptor; ``may_skip``
        names module paths allowed to stay unvisited."""
        visits = _Visits(may_skip) if _visits is None else _visits
        with nn.intercept_methods(_interceptor(self.config, train, self.block_layout, visits, self.layouts)):
            yield

    def __call__(self, *args, params=None, dropout_rng=None, train: bool = False, **kwargs):
        params = self.params if params is None else params
        visits = _Visits(self._heads(params) if kwargs.get("compute_logits") is False else ())
        with self.intercept(train, _visits=visits):
            out = self.model(*args, params=params, dropout_rng=dropout_rng, train=train, **kwargs)
        if not visits.roots and tree_lib.adapted_modules(params):
            raise RuntimeError(
                f"{type(self.model).__name__} ran without calling a flax module under the GraLoRA interceptor, "
                "so its adapters were ignored; the wrapped model must run its flax.linen module when called")
        return out

    @staticmethod
    def _heads(params) -> list[str]:
        """Adapted output heads (``lm_head``): not run when the model stops at the hidden state."""
        return [m for m in tree_lib.adapted_modules(params) if m.rsplit("/", 1)[-1] == "lm_head"]

    def logits_fn(self, params, input_ids, attention_mask=None, *, dropout_rng=None, train: bool = False, **kw):
        """Pure ``params, inputs -> logits``: jit it, differentiate it."""
        return self(input_ids, attention_mask=attention_mask, params=params, dropout_rng=dropout_rng, train=train, **kw).logits

    @property
    def supports_hidden_fn(self) -> bool:
        """True when the wrapped model can stop before the vocabulary projection: its call takes
        ``compute_logits`` and it has ``lm_head_kernel(params)`` (:mod:`gralora_jax.models`; not
        transformers' Flax models). Needed by :meth:`hidden_fn` and :meth:`lm_head`."""
        if not callable(getattr(self.model, "lm_head_kernel", None)):
            return False
        try:
            return "compute_logits" in inspect.signature(self.model.__call__).parameters
        except (TypeError, ValueError):
            return False

    def hidden_fn(self, params, input_ids, attention_mask=None, *, dropout_rng=None, train: bool = False):
        """Pure ``params, inputs -> last_hidden_state`` ``[B, T, hidden]`` (after the final norm), with
        the decoder's adapters applied. The lm_head is not run, so an adapter on it plays no part:
        the caller must check (see :func:`gralora_jax.train.make_causal_lm_loss_fn`)."""
        if not self.supports_hidden_fn:
            raise TypeError(f"{type(self.model).__name__} cannot return hidden states without logits "
                            "(no compute_logits / lm_head_kernel); use logits_fn")
        out = self(input_ids, attention_mask=attention_mask, params=params, dropout_rng=dropout_rng, train=train,
                   compute_logits=False)
        return out.last_hidden_state

    def lm_head(self, params) -> tuple[Any, Optional[float]]:
        """``(kernel [hidden, vocab], final logit soft-cap or None)`` of the wrapped model: the base
        projection only (the embedding transposed when tied; no lm_head adapter), and Gemma2's
        ``c * tanh(logits / c)`` cap, so ``logits == softcap(hidden_fn(...) @ kernel)``."""
        if not self.supports_hidden_fn:
            raise TypeError(f"{type(self.model).__name__} has no lm_head_kernel; use logits_fn")
        return self.model.lm_head_kernel(params), getattr(getattr(self.model, "spec", None), "final_logit_softcap", None)

    # ------------------------------------------------------------------ trees
    @property
    def adapted_modules(self) -> list[str]:
        return tree_lib.adapted_modules(self.params)

    def trainable_mask(self, full: bool = False, params=None) -> dict:
        return tree_lib.trainable_mask(self.params if params is None else params, bias=self.config.bias, full=full)

    def split_params(self, params=None) -> tuple[dict, dict]:
        """``(trainable, frozen)`` by the config's bias rule."""
        p = self.params if params is None else params
        return tree_lib.split_trainable(p, self.trainable_mask(params=p))

    def num_parameters(self, params=None) -> tuple[int, int]:
        p = self.params if params is None else params
        mask = tree_lib.flatten(self.trainable_mask(params=p))
        flat = tree_lib.flatten(p)
        total = sum(int(np.prod(np.shape(v))) for v in flat.values())
        train = sum(int(np.prod(np.shape(v))) for k, v in flat.items() if mask[k])
        return train, total

    def print_trainable_parameters(self) -> str:
        t, a = self.num_parameters()
        line = f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"
        print(line)
        return line

    # ------------------------------------------------------------------ merging
    def merged_params(self, params=None) -> dict:
        """Base-model params with every adapter's delta added to its kernel; adapter leaves removed."""
        p = tree_lib.flatten(self.params if params is None else params)
        out = {k: v for k, v in p.items() if not tree_lib.is_adapter_path(k)}
        for module in tree_lib.adapted_modules(self.params if params is None else params):
            layer = {k.rsplit("/", 1)[1]: v for k, v in p.items() if k.rsplit("/", 1)[0] == module}
            merged = layers.merge(layer, self.scaling, self.layouts.get(module, IN_OUT))
            out[module + "/kernel"] = merged["kernel"]
        return tree_lib.unflatten(out)

    def merge_and_unload(self, params=None) -> dict:
        """PEFT's name: params for the original model class (and its ``save_pretrained``)."""
        return self.merged_params(params)

    # ------------------------------------------------------------------ PEFT files
    def _config_overrides(self) -> dict:
        over = {}
        if any(l == OUT_IN for m, l in self.layouts.items() if m in set(self.adapted_modules)):
            over["fan_in_fan_out"] = True
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        if name and not self.config.base_model_name_or_path:
            over["base_model_name_or_path"] = name
        return over

    def adapter_params(self, params=None) -> dict:
        """What a PEFT adapter file holds: adapter leaves (+ biases when ``bias`` trains them)."""
        p = self.params if params is None else params
        if self.config.bias == "none":
            return tree_lib.split_adapters(p)[0]
        return self.split_params(p)[0]

    def save_pretrained(self, directory: Union[str, os.PathLike], params=None) -> None:
        """Write a PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``).

        Refuses (``ValueError``, nothing written) when there is no adapter tensor or one is not
        finite; otherwise writes the weights, then the config, each atomically
        (:func:`gralora_jax.peft_io.save_adapter`).
        """
        peft_io.save_adapter(directory, self.config, self.adapter_params(params), config_overrides=self._config_overrides())

    @classmethod
    def from_pretrained(
        cls,
        model,
        directory: Union[str, os.PathLike],
        *,
        params=None,
        authors_convention: bool = False,
        adapter_dtype=jnp.float32,
        block_layout: str = layers.DEFAULT_BLOCK_LAYOUT,
    ) -> "GraLoRAModel":
        """Load a PEFT GraLoRA (or LoRA) adapter onto ``model``.

        Refuses, before changing anything, an adapter whose target modules or tensor shapes do
        not fit the model. ``authors_convention=True`` reads adapters saved by the paper
        authors' code (whose ``r`` includes ``hybrid_r``).
        """
        config, loaded = peft_io.load_adapter(directory, authors_convention=authors_convention)
        gm = get_gralora_model(model, config, params=params, rng=jax.random.PRNGKey(0), adapter_dtype=adapter_dtype,
                               block_layout=block_layout)
        scanned = layout_lib.is_scanned(gm.params)
        want_tree = gm.adapter_params()
        # compare in the unrolled layout (the file's); a scanned model then stacks what it read
        want = tree_lib.flatten(layout_lib.unstack_layer_params(want_tree) if scanned else want_tree)
        got = tree_lib.flatten(loaded)
        missing = sorted(set(want) - set(got))
        unexpected = sorted(set(got) - set(want))
        if missing or unexpected:
            raise ValueError(
                f"adapter in {directory} does not fit the model: "
                f"missing {[peft_io.adapter_key(k) for k in missing][:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected {[peft_io.adapter_key(k) for k in unexpected][:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        bad = [(peft_io.adapter_key(k), np.shape(got[k]), np.shape(want[k])) for k in want if np.shape(got[k]) != np.shape(want[k])]
        if bad:
            raise ValueError(
                f"adapter in {directory} does not fit the model (key, file shape, model shape): {bad[:10]}"
            )
        if scanned:
            got = tree_lib.flatten(layout_lib.stack_layer_params(tree_lib.unflatten(got)))
            want = tree_lib.flatten(want_tree)
        flat = tree_lib.flatten(gm.params)
        for k, v in got.items():
            flat[k] = jnp.asarray(v, dtype=want[k].dtype if tree_lib.is_adapter_path(k) else flat[k].dtype)
        gm.params = tree_lib.unflatten(flat)
        return gm


def get_gralora_model(
    model,
    config: AdapterConfig,
    *,
    params=None,
    rng: Optional[jax.Array] = None,
    adapter_dtype=jnp.float32,
    block_layout: str = layers.DEFAULT_BLOCK_LAYOUT,
) -> GraLoRAModel:
    """PEFT's ``get_peft_model`` for Flax: insert adapters, return a :class:`GraLoRAModel`.

    ``model`` is a transformers Flax model (Llama, Mistral, Gemma, GPT-2, BERT, RoBERTa, T5, ...)
    or one of :mod:`gralora_jax.models`; ``params`` defaults to ``model.params``. With
    ``config.target_modules=None`` the model type's PEFT default is used (``q_proj``/``v_proj``
    for Llama, ``c_attn`` for GPT-2, ...). A transformers Flax T5 must have been built with
    :func:`gralora_jax.quirks.patch_t5_clip` applied, as :func:`gralora_jax.loading.build_model`
    does. ``block_layout`` (one of :data:`gralora_jax.layers.BLOCK_LAYOUTS`; same
    function, different memory and speed) is how GraLoRA's block contraction is arranged, see
    :func:`gralora_jax.layers.gralora_blocks`.
    """
    _check_block_layout(block_layout)
    kinds.kind_of(config)  # TypeError for anything but an adapter config
    if params is None:
        params = getattr(model, "params", None)
        if params is None:
            raise ValueError("the model holds no params (built with _do_init=False?): pass params=...")
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules is None:
        default = default_target_modules(model_type)
        if default is not None:  # PEFT's per-architecture default
            config = dataclasses.replace(config, target_modules=default)
    layouts = {path: families.kernel_layout(model_type, path) for path in _linear_modules(params)}
    new, _ = add_adapters(params, config, jax.random.PRNGKey(0) if rng is None else rng, layouts=layouts, adapter_dtype=adapter_dtype)
    return GraLoRAModel(model, config, new, layouts, block_layout=block_layout)
