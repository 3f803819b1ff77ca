#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md, by stage. Writes JSON/Markdown/logs to $OUT (or ./bench_out).
#   bash benchmarks/gpu_suite.sh main1b     # one H200: the 1b table, ours vs PEFT, + traces
#   bash benchmarks/gpu_suite.sh variants   # one H200: 1b loss/contraction variants, 8b with remat
#   bash benchmarks/gpu_suite.sh scaling    # two H200: 1b on mesh 2x1 (data) and 1x2 (tensor)
#   bash benchmarks/gpu_suite.sh hf [all|1b|8b|8b-noremat]
#                                           # one H200: ours beside transformers' FlaxLlama (hf_ methods);
#                                           # needs the wheels in .whl/ (transformers 4.57.6, huggingface-hub
#                                           # 0.36.2, tokenizers 0.22.2), installed into /tmp/hfsite and put
#                                           # on PYTHONPATH of the hf_ children only. "all" (default) = 1b + 8b,
#                                           # bounded by --budget to end inside 9 minutes.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
B="python3 -m benchmarks.train_throughput --batch 8 --seq 1024"
case "${1:-main1b}" in
main1b)
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
  python3 -c "import jax, torch, peft, transformers, flax, optax; print(jax.__version__, jax.devices(), torch.__version__, peft.__version__, transformers.__version__, flax.__version__, optax.__version__)"
  $B --shape 1b --steps 10 --warmup 3 --measure-matmul --methods frozen,lora,gralora2,gralora4,gralora4h16,full \
     --profile lora,gralora4 --profile-dir /tmp/prof --out "$OUT/h200_1b" 2>&1 | tee "$OUT/log_main1b.txt"
  for m in lora gralora4; do f=$(ls /tmp/prof/$m/plugins/profile/*/perfetto_trace.json.gz | head -1); cp "$f" "$OUT/trace_1b_$m.json.gz"; done
  ;;
rest)  # after main1b ran out of time at gralora2: the remaining 1b methods, PEFT, then 8b with remat
  ( $B --shape 1b --steps 10 --warmup 3 --no-peft --timeout 200 --profile gralora4 --profile-dir /tmp/prof \
       --methods gralora4,peft_gralora4,peft_lora,gralora4h16,peft_gralora2,peft_gralora4h16,peft_frozen,full \
       --out "$OUT/h200_1b_rest"
    $B --shape 8b --steps 5 --warmup 2 --remat full --no-peft --timeout 200 --methods gralora4,peft_gralora4,lora \
       --out "$OUT/h200_8b_remat"
  ) 2>&1 | tee "$OUT/log_rest.txt"
  ;;
variants)
  ( $B --shape 1b --steps 10 --warmup 3 --methods lora,gralora4 --attn cudnn --loss chunked --out "$OUT/h200_1b_cudnn_chunked"
    $B --shape 1b --steps 10 --warmup 3 --no-peft --methods lora,gralora4 --contraction remat --out "$OUT/h200_1b_remat_adapter"
    $B --shape 1b --steps 10 --warmup 3 --no-peft --methods gralora4 --contraction unrolled --out "$OUT/h200_1b_unrolled"
    $B --shape 1b --steps 10 --warmup 3 --no-peft --methods lora,gralora4 --contraction bf16 --out "$OUT/h200_1b_bf16"
    $B --shape 8b --steps 5 --warmup 2 --remat full --loss chunked --methods lora,gralora4,full --out "$OUT/h200_8b_remat"
  ) 2>&1 | tee "$OUT/log_variants.txt"
  ;;
scaling)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  ( $B --shape 1b --steps 10 --warmup 3 --no-peft --mesh 2x1 --methods lora,gralora4 --out "$OUT/h200x2_1b_dp"
    $B --shape 1b --steps 10 --warmup 3 --no-peft --mesh 1x2 --methods lora,gralora4 --out "$OUT/h200x2_1b_tp"
  ) 2>&1 | tee "$OUT/log_scaling.txt"
  ;;
hf)
  # FlaxLlama has no gradient checkpointing: at 8b with --remat full its rows are refused (recorded,
  # no child started) and only ours run; "8b-noremat" compares both stacks at 8b without remat, batch 2.
  rm -rf /tmp/hfsite
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/hfsite .whl/*.whl || exit 1
  export BENCH_HF_PYTHONPATH=/tmp/hfsite
  PART=${2:-all}
  case "$PART" in all) T1=320; T8=170 ;; *) T1=500; T8=500 ;; esac
  (
    if [ "$PART" = all ] || [ "$PART" = 1b ]; then
      $B --shape 1b --steps 10 --warmup 3 --no-peft --hf --methods lora,gralora4,frozen \
         --timeout 200 --budget $T1 --out "$OUT/h200_1b_hf"
    fi
    if [ "$PART" = all ] || [ "$PART" = 8b ]; then
      python3 -m benchmarks.train_throughput --shape 8b --batch 8 --seq 1024 --steps 5 --warmup 2 --remat full \
         --loss chunked --no-peft --hf --methods lora,gralora4 --timeout 200 --budget $T8 --out "$OUT/h200_8b_remat_hf"
    fi
    if [ "$PART" = 8b-noremat ]; then
      python3 -m benchmarks.train_throughput --shape 8b --batch 2 --seq 1024 --steps 5 --warmup 2 --remat none \
         --loss chunked --no-peft --hf --methods lora,gralora4 --timeout 200 --budget $T8 --out "$OUT/h200_8b_b2_hf"
    fi
  ) 2>&1 | tee "$OUT/log_hf_$PART.txt"
  ;;
*) echo "unknown stage $1"; exit 2 ;;
esac
