#!/usr/bin/env bash
# VQAv2 test-dev, LLaVA-1.5; chunked over CUDA_VISIBLE_DEVICES. Writes the EvalAI upload (answers are
# hidden, so the result's score stays null; set EVALAI_SCORE=<the server's overall accuracy> to record it).
# Settings: see scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
eval_init liuhaotian/llava-v1.5-7b

SPLIT=llava_vqav2_mscoco_test-dev2015
VQA="$DATA_ROOT/vqav2"
OUT="$VQA/answers/$SPLIT/$CKPT"

timed run_chunks "$OUT" "$PYTHON" -m llava.eval.model_vqa_loader \
    --question-file "$VQA/$SPLIT.jsonl" --image-folder "$VQA/test2015" "${RUN_FLAGS[@]}" --resume

"$PYTHON" -m llava.eval.eval_vqav2 --question-file "$VQA/llava_vqav2_mscoco_test2015.jsonl" \
    --result-file "$OUT/merge.jsonl" --submission-out "$VQA/answers_upload/$SPLIT/$CKPT.json" \
    ${EVALAI_SCORE:+--evalai-score "$EVALAI_SCORE"} \
    --result-json "$VQA/results/$CKPT.json" --model "$CKPT" --schedule "$SCHEDULE_TEXT" \
    --pio-log "$OUT/merge.pio.jsonl" --wall-time "$WALL_TIME"
