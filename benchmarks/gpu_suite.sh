#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md and the README table, by stage. Results go to $OUT
# (or ./bench_out). Written for nvidia-h200-x2 (two H200s of one host): single-GPU stages run
# two independent lanes, one per GPU (CUDA_VISIBLE_DEVICES=0 / 1), so two methods are measured
# at once without sharing a device; on a one-GPU machine run the lanes one after the other
# (LANES=serial).
#
#   bash benchmarks/gpu_suite.sh main1b     # 1b table: attention check, ours (lane 0) | PEFT, 8b remat (lane 1)
#   bash benchmarks/gpu_suite.sh scaling    # both GPUs: 1b on mesh 2x1 (data) and 1x2 (tensor)
#   bash benchmarks/gpu_suite.sh hf         # transformers' FlaxLlama at 1b (lane 0) and 8b batch 2 (lane 1)
#   bash benchmarks/gpu_suite.sh layouts    # GraLoRA block-contraction layouts (memory vs speed)
#   bash benchmarks/gpu_suite.sh profile    # 1b LoRA and GraLoRA k=4: device time by model part (one GPU)
#
# The hf stage needs wheels in .whl/ (transformers 4.57.6, huggingface-hub 0.36.2, tokenizers
# 0.22.2: the GPU image has transformers 5, without Flax); they are installed into /tmp/hfsite and
# put on PYTHONPATH of the hf_ children only.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
B="python3 -m benchmarks.train_throughput --batch 8 --seq 1024 --loss chunked --no-peft"
B1="$B --shape 1b --steps 10 --warmup 3 --timeout 150"

lanes() {  # lanes "<commands for GPU 0>" "<commands for GPU 1>"
  if [ "${LANES:-parallel}" = serial ]; then
    (export CUDA_VISIBLE_DEVICES=0; eval "$1"; eval "$2") > "$OUT/lanes.log" 2>&1
  else
    (export CUDA_VISIBLE_DEVICES=0; eval "$1") > "$OUT/lane0.log" 2>&1 &
    (export CUDA_VISIBLE_DEVICES=1; eval "$2") > "$OUT/lane1.log" 2>&1 &
    wait
  fi
}

case "${1:-main1b}" in
main1b)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$OUT/nvidia_smi.txt"
  python3 -c "import jax, torch, peft, transformers, flax, optax; print(jax.__version__, jax.devices(), torch.__version__, peft.__version__, transformers.__version__, flax.__version__, optax.__version__)" >> "$OUT/nvidia_smi.txt"
  lanes \
    "python3 -m benchmarks.attention_check --json $OUT/attn_check.json > $OUT/attn_check.log 2>&1 || A='--attn xla'
     $B1 \${A:-} --measure-matmul --methods lora,gralora4,frozen,gralora2,gralora4h16,full --out $OUT/l0_1b
     $B1 \${A:-} --layout vjp --methods gralora4,gralora4h16 --out $OUT/l0_1b_vjp" \
    "$B1 --methods peft_lora,peft_gralora4,peft_frozen,peft_gralora2,peft_gralora4h16 --out $OUT/l1_1b_peft
     $B --shape 8b --steps 5 --warmup 2 --timeout 200 --remat full --methods gralora4,lora --out $OUT/l1_8b_remat"
  # one table with the ratios: python -m benchmarks.train_throughput --shape 1b --loss chunked \
  #   --merge $OUT/l0_1b.json $OUT/l1_1b_peft.json [$OUT/l0_1b_hf.json] --out benchmarks/results/h200_1b
  ;;
scaling)
  $B1 --mesh 2x1 --methods lora,gralora4 --out "$OUT/x2_1b_dp" > "$OUT/scaling.log" 2>&1
  $B1 --mesh 1x2 --methods lora,gralora4 --out "$OUT/x2_1b_tp" >> "$OUT/scaling.log" 2>&1
  ;;
hf)
  rm -rf /tmp/hfsite
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/hfsite .whl/*.whl || exit 1
  export BENCH_HF_PYTHONPATH=/tmp/hfsite
  # FlaxLlama has no gradient checkpointing, so the 8b comparison is without remat at batch 2
  lanes "$B1 --methods hf_lora,hf_gralora4,hf_frozen --out $OUT/l0_1b_hf" \
        "$B --shape 8b --batch 2 --steps 5 --warmup 2 --timeout 200 --methods lora,hf_lora --out $OUT/l1_8b_b2_hf"
  ;;
layouts)
  # the same function in every layout (gralora_jax.layers.BLOCK_LAYOUTS); LoRA as the reference in each lane
  lanes "$B1 --methods lora --out $OUT/v_lora0
         $B1 --layout vjp --methods gralora4,gralora2,gralora4h16 --out $OUT/v_vjp" \
        "$B1 --methods lora --out $OUT/v_lora1
         $B1 --layout batched --methods gralora4,gralora2,gralora4h16 --out $OUT/v_batched
         $B1 --layout concat --methods gralora4,gralora2,gralora4h16 --out $OUT/v_concat"
  ;;
profile)
  # kernels joined to the JAX op names of XLA's HLO dump (benchmarks/trace_attribution.py);
  # command buffers off so that each kernel event names its HLO instruction
  for m in lora gralora4; do
    XLA_FLAGS="--xla_dump_to=/tmp/dump_$m --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$ --xla_gpu_enable_command_buffer=" \
      $B1 --methods $m --profile $m --profile-dir /tmp/prof --out "$OUT/profile_$m" > "$OUT/profile_$m.log" 2>&1
    python3 -m benchmarks.trace_attribution /tmp/prof/$m /tmp/dump_$m --json "$OUT/attribution_$m.json" > "$OUT/attribution_$m.txt"
  done
  ;;
*) echo "unknown stage $1"; exit 2 ;;
esac
