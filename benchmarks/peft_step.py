"""The same method in PyTorch + Hugging Face PEFT, timed: ``run_peft(...) -> dict``.

Setup mirrors ours: ``transformers.LlamaForCausalLM`` with random weights in bf16, SDPA
attention, ``peft.get_peft_model`` with ``LoraConfig`` / ``GraloraConfig`` on the seven
projections (PEFT upcasts the adapters to float32: ``autocast_adapter_dtype=True``; checked
below), ``torch.optim.AdamW`` (fused on CUDA) over the trainable parameters, loss from
``labels=input_ids`` (transformers' shifted cross-entropy on float32 logits). With
``remat != "none"`` the model uses transformers' per-layer gradient checkpointing. Eager
mode (no ``torch.compile``), PyTorch's default float32 matmul precision, as PEFT users run it.

Peak memory is ``torch.cuda.max_memory_allocated()`` for the whole process.
"""

from __future__ import annotations

import time

from benchmarks.shapes import PROJECTIONS, Method, Shape


def run_peft(shape: Shape, method: Method, *, batch: int, seq: int, steps: int, warmup: int,
             remat: str = "none", seed: int = 0) -> dict:
    import peft
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t_setup = time.perf_counter()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**shape.hf_config_kwargs(), attn_implementation="sdpa", use_cache=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    if remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method.kind == "lora":
        pcfg = peft.LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=0.0, target_modules=list(PROJECTIONS))
    elif method.kind == "gralora":
        pcfg = peft.GraloraConfig(r=method.r, alpha=method.alpha, gralora_k=method.k, hybrid_r=method.hybrid_r,
                                  gralora_dropout=0.0, target_modules=list(PROJECTIONS))
    elif method.kind == "frozen":
        pcfg = None
    else:
        raise ValueError(f"PEFT side does not run {method.kind!r}")
    net = peft.get_peft_model(model, pcfg) if pcfg is not None else model
    trainable = [p for p in net.parameters() if p.requires_grad] if pcfg is not None else []
    for p in trainable:  # fp32 adapters, as ours (PEFT's autocast_adapter_dtype already does this)
        if p.dtype != torch.float32:
            p.data = p.data.float()
    net.train()
    ids = torch.randint(0, shape.vocab, (batch, seq), device=dev)

    if pcfg is None:
        def step():
            with torch.no_grad():
                return net(input_ids=ids, labels=ids).loss
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-5, fused=(dev == "cuda"))

        def step():
            loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    setup_s = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    out = step()
    sync()
    first_step_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        out = step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync()
    step_s = (time.perf_counter() - t0) / steps
    return {
        "step_s": step_s,
        "compile_s": None,
        "first_step_s": first_step_s,
        "setup_s": setup_s,
        "peak_bytes": int(torch.cuda.max_memory_allocated()) if dev == "cuda" else None,
        "trainable_params": sum(p.numel() for p in trainable),
        "adapter_dtypes": sorted({str(p.dtype) for p in trainable}),
        "loss": float(out),
        "devices": 1,
        "device_kind": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__},
    }
