"""What a Cloud TPU accelerator type means: chips, hosts, JAX devices, and a mesh for it.

A TPU accelerator type is ``<generation>-<N>``. The number ``N`` counts TensorCores for
v2, v3, v4 and v5p (two per chip) but chips for v5e (``v5litepod``) and v6e (one
TensorCore per chip). Every multi-host slice has 4 chips per host (VM); v5e and v6e
slices of up to 8 chips are one host.

JAX sees one device per chip on v4 and v5p (the two cores act as one "megacore") and on
v5e/v6e, but one device per TensorCore on v2 and v3. A ``--mesh DxM`` for our training
CLI must multiply to the number of JAX devices of the whole slice (all hosts together):
``D`` is the data-parallel axis (each replica sees a different part of the batch) and
``M`` the model axis (each weight matrix is split over ``M`` devices). A 3-axis
``--mesh DxFxM`` adds an FSDP axis ``F``: the weights are sharded over it like a model
axis, but it also splits the batch (for models too large to replicate).

>>> spec = parse_accelerator("v4-32")
>>> (spec.chips, spec.hosts, spec.devices)
(16, 4, 16)
>>> suggest_mesh("v4-8")
'4x1'
>>> suggest_meshes("v4-32")
['16x1', '8x2', '4x4']
"""

from __future__ import annotations

import dataclasses
import re

from gralora_jax.meshspec import parse_mesh

# generation -> (N counts TensorCores?, JAX device per TensorCore?, HBM GiB per JAX device,
#                default runtime version); runtime versions per the Cloud TPU runtime docs.
_GENERATIONS: dict[str, tuple[bool, bool, float, str]] = {
    "v2": (True, True, 8.0, "tpu-ubuntu2204-base"),
    "v3": (True, True, 16.0, "tpu-ubuntu2204-base"),
    "v4": (True, False, 32.0, "tpu-ubuntu2204-base"),
    "v5p": (True, False, 95.0, "v2-alpha-tpuv5"),
    "v5litepod": (False, False, 16.0, "v2-alpha-tpuv5-lite"),
    "v6e": (False, False, 32.0, "v2-alpha-tpuv6e"),
}

# Names people type that gcloud does not accept, with the name it does.
_ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod"}

CHIPS_PER_HOST = 4  # multi-host slices of every generation put 4 chips on each VM
_SINGLE_HOST_CHIP_COUNTS = (1, 4, 8)  # v5e / v6e slices that fit on one VM

_TYPE_RE = re.compile(r"^(v[0-9][a-z]*)-([0-9]+)$")


@dataclasses.dataclass(frozen=True)
class AcceleratorSpec:
    """The shape of one TPU slice, derived from its accelerator type."""

    accelerator_type: str  # as gcloud spells it, e.g. "v4-32"
    generation: str  # "v2", "v3", "v4", "v5p", "v5litepod" or "v6e"
    chips: int  # physical chips in the slice
    hosts: int  # TPU VMs (workers) in the slice; >1 means a multi-host pod slice
    devices: int  # jax.device_count() on the slice (all hosts together)
    hbm_gib_per_device: float  # high-bandwidth memory of one JAX device, GiB
    default_version: str  # runtime (--version) to use when none is given

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def devices_per_host(self) -> int:
        """jax.local_device_count() on each worker."""
        return self.devices // self.hosts

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def parse_accelerator(accelerator_type: str) -> AcceleratorSpec:
    """Chips, hosts and JAX devices of a TPU accelerator type.

    >>> parse_accelerator("v4-8").hosts, parse_accelerator("v4-8").chips
    (1, 4)
    >>> parse_accelerator("v5litepod-16").hosts
    4
    >>> parse_accelerator("v3-8").devices  # one JAX device per TensorCore on v2/v3
    8
    """
    text = accelerator_type.strip().lower()
    match = _TYPE_RE.match(text)
    if not match:
        raise ValueError(
            f"accelerator type {accelerator_type!r} is not of the form <generation>-<N>, "
            f"e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8"
        )
    generation, number = match.group(1), int(match.group(2))
    if generation in _ALIASES:
        proper = f"{_ALIASES[generation]}-{number}"
        raise ValueError(f"gcloud calls {accelerator_type!r} {proper!r}; use --accelerator-type {proper}")
    if generation not in _GENERATIONS:
        raise ValueError(
            f"unknown TPU generation {generation!r} in {accelerator_type!r}; "
            f"known: {', '.join(sorted(_GENERATIONS))}"
        )
    counts_cores, device_per_core, hbm, version = _GENERATIONS[generation]
    if counts_cores:
        # N is TensorCores: 2 per chip, 4 chips per host, so slices come in multiples of 8.
        if number < 8 or number % 8:
            raise ValueError(
                f"{accelerator_type!r}: for {generation} the number counts TensorCores "
                f"(2 per chip, 4 chips per host) and must be a multiple of 8, e.g. {generation}-8"
            )
        chips = number // 2
        hosts = chips // CHIPS_PER_HOST
        devices = number if device_per_core else chips
    else:
        # N is chips: 1, 4 or 8 on one host, else 4 chips per host.
        if number not in _SINGLE_HOST_CHIP_COUNTS and (number < 16 or number % CHIPS_PER_HOST):
            raise ValueError(
                f"{accelerator_type!r}: for {generation} the number counts chips and must be "
                f"1, 4, 8 or a multiple of 4 from 16 on, e.g. {generation}-16"
            )
        chips = number
        hosts = 1 if number in _SINGLE_HOST_CHIP_COUNTS else number // CHIPS_PER_HOST
        devices = chips
    return AcceleratorSpec(
        accelerator_type=text,
        generation=generation,
        chips=chips,
        hosts=hosts,
        devices=devices,
        hbm_gib_per_device=hbm,
        default_version=version,
    )


def default_runtime_version(accelerator_type: str) -> str:
    """The TPU software version (``--version``) to create a slice of this type with.

    >>> default_runtime_version("v4-32")
    'tpu-ubuntu2204-base'
    >>> default_runtime_version("v5litepod-16")
    'v2-alpha-tpuv5-lite'
    """
    return parse_accelerator(accelerator_type).default_version


def _powers_of_two_dividing(n: int, limit: int) -> list[int]:
    out, m = [], 1
    while m <= limit and n % m == 0:
        out.append(m)
        m *= 2
    return out


# Memory model for sizing a mesh from the base model's size: the frozen base in bf16 (2 bytes
# per parameter) plus trainable adapters of at most ADAPTER_FRACTION of the base's parameters,
# each held in float32 with a gradient and Adam's two moments (16 bytes). Half of each
# device's HBM is kept free for activations and XLA's temporaries.
BASE_BYTES_PER_PARAM = 2
ADAPTER_FRACTION = 0.01
ADAPTER_BYTES_PER_PARAM = 16
HBM_FRACTION_FOR_WEIGHTS = 0.5


def training_state_gib(params_billion: float) -> float:
    """Estimated GiB of weights + adapter training state for a base of ``params_billion``.

    >>> round(training_state_gib(7), 1)
    14.1
    """
    if params_billion <= 0:
        raise ValueError(f"params_billion must be positive, got {params_billion}")
    n = params_billion * 1e9
    return (n * BASE_BYTES_PER_PARAM + n * ADAPTER_FRACTION * ADAPTER_BYTES_PER_PARAM) / 2**30


def suggest_meshes(accelerator_type: str, params_billion: float | None = None) -> list[str]:
    """Good ``--mesh`` strings for a slice, best first: ``DxM`` (data x model) or, for models
    that do not fit with a model axis inside one host, ``DxFx1`` (data x fsdp x model).

    The model axis never spans hosts (our per-process batch slicing needs every host to hold
    whole model-axis groups, and splitting a weight across hosts is rarely worth it).

    Without a model size: pure data parallelism (``Nx1``) first -- adapters are tiny and the
    frozen base is replicated -- then model axes 2, 4, ... up to the devices of one host.

    With ``params_billion``: the estimate of :func:`training_state_gib`, split over the
    model axis (and the fsdp axis), must fill at most half of one device's HBM. The
    smallest model axis within a host that fits comes first, larger ones follow; when no
    model axis within a host fits, FSDP meshes (weights sharded over ``F`` devices, batch
    over ``D x F``) are suggested, the two smallest ``F`` that fit; they are also listed as
    alternatives when the model fits only with a model axis.

    >>> suggest_meshes("v4-8")
    ['4x1', '2x2', '1x4']
    >>> suggest_meshes("v5litepod-16", params_billion=7)
    ['8x2', '4x4', '8x2x1', '4x4x1']
    >>> suggest_meshes("v4-32", params_billion=70)
    ['1x16x1']
    """
    spec = parse_accelerator(accelerator_type)
    in_host = _powers_of_two_dividing(spec.devices, spec.devices_per_host)
    if params_billion is None:
        return [f"{spec.devices // m}x{m}" for m in in_host]
    need = training_state_gib(params_billion)
    budget = spec.hbm_gib_per_device * HBM_FRACTION_FOR_WEIGHTS
    model_axes = [m for m in in_host if need / m <= budget]
    fsdp_axes = [f for f in _powers_of_two_dividing(spec.devices, spec.devices) if f > 1 and need / f <= budget]
    meshes = [f"{spec.devices // m}x{m}" for m in model_axes]
    if not model_axes or model_axes[0] > 1:  # does not fit replicated: FSDP is an option
        meshes += [f"{spec.devices // f}x{f}x1" for f in fsdp_axes[:2]]
    if not meshes:
        raise ValueError(
            f"a {params_billion:g}B-parameter model (~{need:.0f} GiB of bf16 weights and adapter state) does "
            f"not fit {spec.accelerator_type} ({spec.devices} devices x {spec.hbm_gib_per_device:g} GiB) with "
            f"half of HBM kept free, even fully sharded; pick a larger slice"
        )
    return meshes


def suggest_mesh(accelerator_type: str, params_billion: float | None = None) -> str:
    """The first of :func:`suggest_meshes`.

    >>> suggest_mesh("v4-32")
    '16x1'
    """
    return suggest_meshes(accelerator_type, params_billion)[0]


def _axes(mesh: str) -> str:
    return " x ".join(parse_mesh(mesh))


def describe(accelerator_type: str, params_billion: float | None = None) -> str:
    """A few human-readable lines about a slice and the meshes to use on it."""
    spec = parse_accelerator(accelerator_type)
    meshes = suggest_meshes(accelerator_type, params_billion)
    lines = [
        f"accelerator type   {spec.accelerator_type}",
        f"chips              {spec.chips}",
        f"hosts (workers)    {spec.hosts}" + ("  (multi-host: use --worker=all)" if spec.multi_host else ""),
        f"chips per host     {spec.chips_per_host}",
        f"JAX devices        {spec.devices} ({spec.devices_per_host} per host, "
        f"{spec.hbm_gib_per_device:g} GiB HBM each)",
        f"runtime version    {spec.default_version}",
        f"suggested --mesh   {meshes[0]}   ({_axes(meshes[0])})",
    ]
    if len(meshes) > 1:
        lines.append(f"alternatives       {', '.join(meshes[1:])}")
    return "\n".join(lines)
