#!/usr/bin/env bash
# GQA testdev-balanced, LLaVA-1.5; chunked over CUDA_VISIBLE_DEVICES. Settings: see scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
eval_init liuhaotian/llava-v1.5-7b

SPLIT=llava_gqa_testdev_balanced
GQA="$DATA_ROOT/gqa"
OUT="$GQA/answers/$SPLIT/$CKPT"

timed run_chunks "$OUT" "$PYTHON" -m llava.eval.model_vqa_loader \
    --question-file "$GQA/$SPLIT.jsonl" --image-folder "$GQA/data/images" "${RUN_FLAGS[@]}" --resume

"$PYTHON" -m llava.eval.eval_gqa --annotation-file "$GQA/data/testdev_balanced_questions.json" \
    --result-file "$OUT/merge.jsonl" --convert-out "$OUT/testdev_balanced_predictions.json" \
    --result-json "$GQA/results/$CKPT.json" --model "$CKPT" --schedule "$SCHEDULE_TEXT" \
    --pio-log "$OUT/merge.pio.jsonl" --wall-time "$WALL_TIME"
