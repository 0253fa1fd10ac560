#!/usr/bin/env bash
# TextVQA val (with OCR tokens in the prompt), LLaVA-1.5; chunked over CUDA_VISIBLE_DEVICES.
# Settings: see scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
eval_init liuhaotian/llava-v1.5-7b

TVQA="$DATA_ROOT/textvqa"
OUT="$TVQA/answers/$CKPT"

timed run_chunks "$OUT" "$PYTHON" -m llava.eval.model_vqa_loader \
    --question-file "$TVQA/llava_textvqa_val_v051_ocr.jsonl" --image-folder "$TVQA/train_images" \
    "${RUN_FLAGS[@]}" --resume

"$PYTHON" -m llava.eval.eval_textvqa --annotation-file "$TVQA/TextVQA_0.5.1_val.json" \
    --result-file "$OUT/merge.jsonl" \
    --result-json "$TVQA/results/$CKPT.json" --model "$CKPT" --schedule "$SCHEDULE_TEXT" \
    --pio-log "$OUT/merge.pio.jsonl" --wall-time "$WALL_TIME"
