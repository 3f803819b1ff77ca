"""What GraLoRA's block structure buys and what it costs, at the same parameter count as LoRA.

GraLoRA with ``k`` and rank ``r`` splits the update into ``k x k`` blocks, block ``(n, j)``
being ``A[n][:, j-th slice] @ B[j][n-th slice]`` of rank ``r/k`` with its own factors; its
parameters ``r * (in + out)`` are LoRA's at rank ``r``, but its update can reach rank ``k * r``.

* A target built block by block (every block of rank ``r/k``, independent factors: rank ``k*r``)
  is fitted to near zero error by trained GraLoRA, while LoRA of rank ``r`` cannot get below
  the Eckart-Young bound (the energy of the target's singular values after the ``r``-th).
* A globally rank-``r`` target is the reverse: LoRA fits it, GraLoRA cannot get below the sum
  over blocks of each block's bound at rank ``r/k`` (each block of it has rank ``r``).

Both sides train the real parameterisation (``layers.init_*_adapter`` and ``layers.delta_kernel``)
with optax on a 32 x 32 matrix; the lower bounds are exact, so "cannot" does not depend on
how long the training ran.
"""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from gralora_jax.layers import delta_kernel, init_gralora_adapter, init_lora_adapter

MATMUL_PRECISION = "highest"  # set around this module by conftest.matmul_precision

N, K, R = 32, 2, 4  # in = out = N; GraLoRA blocks K x K; rank R (per block R // K)
STEPS = 600


def block_target(rng):
    """``K x K`` blocks, each a product of its own ``[N/K, R/K] @ [R/K, N/K]`` factors."""
    b, s = N // K, R // K
    rows = [np.concatenate([rng.standard_normal((b, s)) @ rng.standard_normal((s, b)) for _ in range(K)], axis=1)
            for _ in range(K)]
    return np.concatenate(rows, axis=0) / np.sqrt(s)


def global_target(rng):
    return rng.standard_normal((N, R)) @ rng.standard_normal((R, N)) / np.sqrt(R)


def tail_energy(m, rank):
    """min ||m - X||^2 over X of rank <= rank (Eckart-Young)."""
    sv = np.linalg.svd(m, compute_uv=False)
    return float(np.sum(sv[rank:] ** 2))


def lora_bound(target):
    return tail_energy(target, R) / float(np.sum(target**2))


def gralora_bound(target):
    b = N // K
    blocks = [target[n * b:(n + 1) * b, j * b:(j + 1) * b] for n in range(K) for j in range(K)]
    return sum(tail_energy(blk, R // K) for blk in blocks) / float(np.sum(target**2))


def fit(adapter, target):
    """Relative squared error ``||delta - target||^2 / ||target||^2`` after Adam on the factors."""
    target = jnp.asarray(target, jnp.float32)
    opt = optax.adam(optax.cosine_decay_schedule(3e-2, STEPS, alpha=1e-3))

    def loss(p):
        return jnp.sum((delta_kernel(p, 1.0) - target) ** 2) / jnp.sum(target**2)

    @jax.jit
    def train(p):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=STEPS)
        return loss(p)

    return float(train(adapter))


def adapters(seed) -> dict:
    """GraLoRA and LoRA adapters of the same parameter count, by name."""
    key = jax.random.PRNGKey(seed)
    gra = init_gralora_adapter(key, N, N, R, K, init_weights=False)
    lora = init_lora_adapter(key, N, N, R, init_weights=False)
    count = lambda a: sum(v.size for v in a.values())  # noqa: E731
    assert count(gra) == count(lora) == R * 2 * N  # the comparison is at equal parameter count
    return {"gralora": gra, "lora": lora}


BOUNDS = {"gralora": gralora_bound, "lora": lora_bound}


# (target builder, the target's rank, the adapter that fits it, the adapter that cannot)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("make_target, rank, fits, cannot", [
    pytest.param(block_target, K * R, "gralora", "lora", id="block_structured_gralora_fits_lora_cannot"),
    pytest.param(global_target, R, "lora", "gralora", id="globally_low_rank_lora_fits_gralora_cannot"),
])
def test_one_adapter_fits_the_target_the_other_cannot(make_target, rank, fits, cannot, seed):
    target = make_target(np.random.default_rng(seed))
    assert np.linalg.matrix_rank(target) == rank
    adapter = adapters(seed)
    assert BOUNDS[fits](target) < 1e-10
    bound = BOUNDS[cannot](target)
    assert bound > 0.1
    assert fit(adapter[fits], target) < 1e-4
    assert fit(adapter[cannot], target) >= bound - 1e-4
