"""A tiny pure-JAX causal LM with GraLoRA adapters, its data, and a training script.

Imported by the training/checkpoint tests (toy model + data iterator) and run as a
subprocess by the resume / SIGTERM tests:

    python tests/_train_worker.py OUT_DIR --steps 6 --ckpt-every 3 [--pause-after 3] [--mesh 4x2]
        [--signal-self-at 2 --signal INT]        (exits with gralora_jax.train.exit_code(stop_reason))
    python tests/_train_worker.py --dist-train PROCESS_ID PORT OUT_DIR --steps 12 [--sleep 0.3]
        (one of two processes training with a Trainer on one 4x2 mesh; prints STEP n per batch)

The model is a bigram-style residual MLP whose Dense layers use HF names (q_proj, o_proj,
up_proj, down_proj, lm_head) so the llama sharding rules apply; adapters sit beside kernels.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # device count must be fixed before jax is imported
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gralora_jax.hostdevices import ensure_host_devices

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _mesh = sys.argv[sys.argv.index("--mesh") + 1] if "--mesh" in sys.argv else "4x2"
    if "--dist" in sys.argv or "--dist-train" in sys.argv:  # two processes x 4 devices make one 4x2 mesh
        _mesh = "2x2"
    _n = 1
    for _d in _mesh.split("x"):
        _n *= int(_d)
    ensure_host_devices(_n)

import jax
import jax.numpy as jnp
import numpy as np

from gralora_jax.layers import adapter_output
from gralora_jax.losses import causal_lm_loss

VOCAB, D, FF, R, K = 64, 32, 64, 8, 2
SCALING = 16 / R
LAYERS = (("self_attn", "q_proj", D, D, 0), ("self_attn", "o_proj", D, D, 2),
          ("mlp", "up_proj", D, FF, 0), ("mlp", "down_proj", FF, D, 0))


def toy_params(seed: int = 0, n_layers: int = 2) -> dict:
    """Random base + GraLoRA adapters (B random too, so every path matters)."""
    g = np.random.default_rng(seed)  # numpy: eager jax.random would compile per shape (slow on CI)

    def u(shape, fan_in):
        return g.uniform(-1, 1, shape).astype(np.float32) / np.float32(np.sqrt(fan_in))

    layers = {}
    for i in range(n_layers):
        layer: dict = {"post_norm": {"weight": np.ones((D,), np.float32)}}
        for group, name, din, dout, hybrid in LAYERS:
            mod = {"kernel": u((din, dout), din),  # GraLoRA shapes; B random so every path matters
                   "gralora_A": u((K, din // K, R), din // K), "gralora_B": u((K, R, dout // K), R)}
            if hybrid:
                mod["gralora_A_general"] = u((din, hybrid), din)
                mod["gralora_B_general"] = u((hybrid, dout), hybrid)
            layer.setdefault(group, {})[name] = mod
        layers[str(i)] = layer
    return {
        "model": {
            "embed_tokens": {"embedding": g.normal(size=(VOCAB, D)).astype(np.float32)},
            "layers": layers,
            "norm": {"weight": np.ones((D,), np.float32)},
        },
        "lm_head": {"kernel": u((D, VOCAB), D)},
    }


def _dense(mod, x):
    y = x @ mod["kernel"]
    adapter = {k: v for k, v in mod.items() if k != "kernel"}
    return y + adapter_output(x, adapter, SCALING) if adapter else y


def _rms(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def toy_logits(params, input_ids):
    m = params["model"]
    h = m["embed_tokens"]["embedding"][input_ids]
    for i in sorted(m["layers"], key=int):
        lyr = m["layers"][i]
        a = lyr["self_attn"]
        h = h + _dense(a["o_proj"], jnp.tanh(_dense(a["q_proj"], h)))
        f = lyr["mlp"]
        h = _rms(h + _dense(f["down_proj"], jax.nn.gelu(_dense(f["up_proj"], h))), lyr["post_norm"]["weight"])
    return _rms(h, m["norm"]["weight"]) @ params["lm_head"]["kernel"]


def toy_loss_fn(params, batch, rng, train):
    logits = toy_logits(params, batch["input_ids"])
    loss, n = causal_lm_loss(logits, batch["input_ids"], batch.get("loss_mask"))
    return loss, {"num_tokens": n}


class ToyData:
    """Deterministic batches: batch i depends only on (seed, i). state() = position."""

    def __init__(self, batch: int = 8, seq: int = 8, seed: int = 0, nan_at: int | None = None):
        self.batch, self.seq, self.seed, self.index, self.nan_at = batch, seq, seed, 0, nan_at

    def get(self, i: int) -> dict:
        g = np.random.default_rng(self.seed * 100003 + i)
        ids = g.integers(0, VOCAB, (self.batch, self.seq), dtype=np.int32)
        mask = (g.random((self.batch, self.seq)) > 0.25).astype(np.float32)
        return {"input_ids": ids, "loss_mask": mask}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.get(self.index)
        self.index += 1
        return b

    def state(self) -> dict:
        return {"index": self.index}

    def restore(self, state: dict) -> None:
        self.index = int(state["index"])


def dist_main(process_id: int, port: int) -> int:
    """One of two CPU processes (4 host devices each) training on a global 4x2 mesh."""
    from gralora_jax.distributed import global_batch_from_local, maybe_initialize_distributed, process_batch_slice
    from gralora_jax.optim import make_optimizer
    from gralora_jax.sharding import make_mesh, param_partition_specs
    from gralora_jax.train import init_train_state, make_train_step
    from gralora_jax.tree import trainable_mask

    assert maybe_initialize_distributed(f"localhost:{port}", 2, process_id)
    print(f"PROCS {jax.process_count()} DEVICES {jax.device_count()} LOCAL {jax.local_device_count()}", flush=True)
    params = toy_params(0, n_layers=1)
    mask = trainable_mask(params)
    mesh = make_mesh("4x2")
    opt = make_optimizer(toy_optim(), params, mask)
    specs = param_partition_specs(params, "llama", mesh)
    step = make_train_step(toy_loss_fn, opt, mask, mesh, specs, params)
    state, frozen = init_train_state(params, mask, opt, mesh, specs)
    data, rows = ToyData(), process_batch_slice(8)
    for _ in range(3):
        local = {k: v[rows] for k, v in next(data).items()}
        state, m = step(state, frozen, global_batch_from_local(local, sharding=step.batch_sharding))
        print(f"LOSS {float(m['loss']):.9g}", flush=True)
    return 0


def toy_optim():
    from gralora_jax.optim import OptimConfig

    return OptimConfig(optimizer="adamw", learning_rate=1e-2, total_steps=10, warmup_steps=0, weight_decay=0.01)


def smoke_main() -> int:
    """Accelerator smoke run (not used by CI): meshes over all local devices vs one device,
    then a short Trainer run with checkpoint + restore. Prints one line per check."""
    import time

    from gralora_jax.optim import make_optimizer
    from gralora_jax.sharding import make_mesh, param_partition_specs
    from gralora_jax.train import init_train_state, make_train_step
    from gralora_jax.tree import trainable_mask

    n = jax.device_count()
    print(f"DEVICES {n} {jax.devices()[0].platform} {jax.devices()[0].device_kind} jax {jax.__version__}", flush=True)
    params = toy_params(0, n_layers=2)
    mask = trainable_mask(params)
    results = {}
    for spec in ["1x1", f"{n}x1", f"1x{n}"]:
        mesh = make_mesh(spec, devices=jax.devices()[: 1 if spec == "1x1" else n])
        opt = make_optimizer(toy_optim(), params, mask)
        specs = param_partition_specs(params, "llama", mesh)
        for accum in (1, 2):
            step = make_train_step(toy_loss_fn, opt, mask, mesh, specs, params, grad_accum=accum)
            state, frozen = init_train_state(params, mask, opt, mesh, specs)
            data, losses, t0 = ToyData(batch=8, seq=16), [], time.perf_counter()
            for _ in range(4):
                state, m = step(state, frozen, jax.device_put(next(data), step.batch_sharding))
                losses.append(float(m["loss"]))
            dt = time.perf_counter() - t0
            flat = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]
            results[(spec, accum)] = (losses, flat)
            ref_l, ref_p = results[("1x1", 1)]
            dl = max(abs(a - b) for a, b in zip(losses, ref_l))
            dp = max(float(np.max(np.abs(a - b))) for a, b in zip(flat, ref_p))
            print(f"MESH {spec} accum={accum} losses={[round(x, 6) for x in losses]} traces={step.trace_count} "
                  f"max|dloss|={dl:.2e} max|dparam|={dp:.2e} time(4 steps incl compile)={dt:.1f}s", flush=True)
    return 0


def main(argv=None) -> int:
    import argparse
    import signal
    import time

    from gralora_jax.optim import OptimConfig
    from gralora_jax.sharding import make_mesh, param_partition_specs
    from gralora_jax.train import TrainConfig, Trainer, exit_code
    from gralora_jax.tree import trainable_mask

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ckpt-every", type=int, default=3)
    ap.add_argument("--pause-after", type=int, default=0, help="after this step's checkpoint is committed, block")
    ap.add_argument("--signal-self-at", type=int, default=0, help="send --signal to self when this step's batch is drawn")
    ap.add_argument("--signal", choices=("INT", "TERM"), default="TERM")
    ap.add_argument("--mesh", default="4x2")
    a = ap.parse_args(argv)

    mesh = make_mesh(a.mesh)
    params = toy_params(0)
    data = ToyData()
    cfg = TrainConfig(steps=a.steps, checkpoint_every=a.ckpt_every, output_dir=a.out, log_every=1,
                      progress=False, keep_checkpoints=10)
    optim = OptimConfig(optimizer="adamw", learning_rate=1e-2, total_steps=a.steps, warmup_steps=1)
    trainer = Trainer(loss_fn=toy_loss_fn, params=params, mask=trainable_mask(params), optim=optim, config=cfg,
                      mesh=mesh, param_specs=param_partition_specs(params, "llama", mesh),
                      checkpoint_meta={"adapter_config": {"r": R, "gralora_k": K}, "base_model": "toy"})
    resumed = trainer.restore(data)
    print(f"RESUMED {int(resumed)} AT {trainer.step}", flush=True)

    class Hooked:  # wraps the data iterator to inject pause / SIGTERM at step boundaries
        def __next__(self):
            nxt = trainer.step + 1  # the step this batch is for
            if a.pause_after and nxt == a.pause_after + 1:
                trainer.checkpointer.wait_until_finished()
                print(f"COMMITTED {trainer.checkpointer.latest_step()}", flush=True)
                while True:
                    time.sleep(1)
            if a.signal_self_at and nxt == a.signal_self_at:
                os.kill(os.getpid(), getattr(signal, "SIG" + a.signal))
            return next(data)

        def state(self):
            return data.state()

        def restore(self, s):
            data.restore(s)

    trainer.fit(Hooked())
    flat = jax.tree_util.tree_leaves(trainer.state.params)
    np.savez(os.path.join(a.out, f"params_step{trainer.step}.npz"), *[np.asarray(x) for x in flat])
    print(f"DONE {trainer.stop_reason} AT {trainer.step}", flush=True)
    return exit_code(trainer.stop_reason)


def dist_train_main(argv) -> int:
    """One of two processes running a Trainer on one 4x2 mesh, checkpointing to a shared dir."""
    import argparse
    import time

    from jax.experimental import multihost_utils

    from gralora_jax.distributed import maybe_initialize_distributed, process_batch_slice
    from gralora_jax.sharding import make_mesh, param_partition_specs
    from gralora_jax.train import TrainConfig, Trainer, exit_code
    from gralora_jax.tree import trainable_mask

    ap = argparse.ArgumentParser()
    ap.add_argument("process_id", type=int)
    ap.add_argument("port", type=int)
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per batch (time to deliver a signal)")
    a = ap.parse_args(argv)
    assert maybe_initialize_distributed(f"localhost:{a.port}", 2, a.process_id)
    mesh = make_mesh("4x2")
    params = toy_params(0, n_layers=1)
    cfg = TrainConfig(steps=a.steps, output_dir=a.out, log_every=100, stop_check_every=2, progress=False,
                      tensorboard=False)
    trainer = Trainer(loss_fn=toy_loss_fn, params=params, mask=trainable_mask(params), optim=toy_optim(), config=cfg,
                      mesh=mesh, param_specs=param_partition_specs(params, "llama", mesh),
                      checkpoint_meta={"adapter_config": {"r": R}, "base_model": "toy"})
    data, rows = ToyData(), process_batch_slice(8)

    class Local:
        def __next__(self):
            print(f"STEP {data.index + 1}", flush=True)
            time.sleep(a.sleep)
            return {k: v[rows] for k, v in next(data).items()}

        def state(self):
            return data.state()

        def restore(self, s):
            data.restore(s)

    print(f"RESUMED {int(trainer.restore(data))} AT {trainer.step}", flush=True)
    trainer.fit(Local())
    flat = multihost_utils.process_allgather(jax.tree_util.tree_leaves(trainer.state.params), tiled=True)
    if jax.process_index() == 0:
        np.savez(os.path.join(a.out, f"params_step{trainer.step}.npz"), *[np.asarray(x) for x in flat])
    print(f"DONE {trainer.stop_reason} AT {trainer.step} CKPT {trainer.checkpointer.latest_step()}", flush=True)
    return exit_code(trainer.stop_reason)


if __name__ == "__main__":
    if "--dist-train" in sys.argv:
        sys.exit(dist_train_main(sys.argv[sys.argv.index("--dist-train") + 1:]))
    if "--smoke" in sys.argv:
        sys.exit(smoke_main())
    if "--dist" in sys.argv:
        i = sys.argv.index("--dist")
        sys.exit(dist_main(int(sys.argv[i + 1]), int(sys.argv[i + 2])))
    sys.exit(main())
