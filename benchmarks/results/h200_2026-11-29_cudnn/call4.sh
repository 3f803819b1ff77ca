#!/usr/bin/env bash
# 2026-11-29, call 4 on nvidia-h200-x2: two more GraLoRA contraction layouts, two single-GPU lanes
set -u
export PYTHONUNBUFFERED=1
O=/tmp/r; mkdir -p $O
B="python3 -m benchmarks.train_throughput --shape 1b --batch 8 --seq 1024 --loss chunked --no-peft --steps 10 --warmup 3 --timeout 90"
lane0() { export CUDA_VISIBLE_DEVICES=0; $B --contraction jfirst --methods gralora4,gralora2,gralora4h16 --out $O/v_jfirst; }
lane1() { export CUDA_VISIBLE_DEVICES=1; $B --contraction jfirst_unrolled --methods gralora4,gralora2,gralora4h16 --out $O/v_jfirst_unrolled; }
export -f lane0 lane1; export B O
timeout ${LANE_S:-200} bash -c lane0 > $O/lane0.log 2>&1 &
timeout ${LANE_S:-200} bash -c lane1 > $O/lane1.log 2>&1 &
wait
tar czf $OUT/results.tgz -C $O . ; cp $O/lane0.log $O/lane1.log $OUT/
for f in $O/*.md; do echo $f; grep -h "^|" $f | grep -v "^|---" | grep -v "^| method"; done
