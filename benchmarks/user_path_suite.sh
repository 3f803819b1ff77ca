#!/usr/bin/env bash
# The user-path runs behind the README's "user path" table, on one GPU, by stage:
#   bash benchmarks/user_path_suite.sh small   # SmolLM2-135M social_iqa run (issue setup) + Llama-3.2-1B at 16x256 and 8x1024
#   bash benchmarks/user_path_suite.sh big     # Llama-3.1-8B at 16x256 and 8x1024
# Results (JSON + Markdown per run, logs) go to $RESULTS (default /tmp/user_path_results).
set -u
export PYTHONUNBUFFERED=1
R=${RESULTS:-/tmp/user_path_results}; mkdir -p "$R"
W=${WORK:-/tmp/gralora_user_path}
UP="python3 -m benchmarks.user_path --work-dir $W"
stage=${1:-small}
case "$stage" in
  small)
    # the SmolLM2-135M run: 1500 social_iqa records, 2 epochs, batch 16, cutoff 256, dropout 0.05
    $UP --shape 135m --records 1500 --epochs 2 --batch 16 --seq 256 --natural-length --no-library \
        --cli-args "--r 32 --alpha 64 --k 4 --dropout 0.05 --lr 5e-4 --optimizer adamw" \
        --label "135m social_iqa 2 ep, gralora" --out "$R/135m_gralora" 2>&1 | tee "$R/135m_gralora.log"
    $UP --shape 1b --batch 16 --seq 256 --steps 30 --label "1b paper preset" --out "$R/1b_16x256" 2>&1 | tee "$R/1b_16x256.log"
    $UP --shape 1b --batch 8 --seq 1024 --steps 30 --label "1b paper preset" --out "$R/1b_8x1024" 2>&1 | tee "$R/1b_8x1024.log"
    $UP --shape 135m --records 1500 --epochs 2 --batch 16 --seq 256 --natural-length --no-library --method lora \
        --cli-args "--r 32 --alpha 64 --dropout 0.05 --lr 5e-4 --optimizer adamw" \
        --label "135m social_iqa 2 ep, lora" --out "$R/135m_lora" 2>&1 | tee "$R/135m_lora.log"
    ;;
  big)
    $UP --shape 8b --batch 16 --seq 256 --steps 20 --library-remat full --label "8b paper preset" --out "$R/8b_16x256" 2>&1 | tee "$R/8b_16x256.log"
    $UP --shape 8b --batch 8 --seq 1024 --steps 20 --no-library --label "8b paper preset" --out "$R/8b_8x1024" 2>&1 | tee "$R/8b_8x1024.log"
    ;;
  *) echo "unknown stage $stage (small | big)"; exit 2 ;;
esac
