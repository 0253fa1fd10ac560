#!/usr/bin/env bash
# POPE (adversarial, popular, random; score = mean F1), LLaVA-1.5. Settings: see scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
eval_init liuhaotian/llava-v1.5-7b

POPE="$DATA_ROOT/pope"
ANS="$POPE/answers/$CKPT"
mkdir -p "$POPE/answers"

timed "$PYTHON" -m llava.eval.model_vqa_loader \
    --question-file "$POPE/llava_pope_test.jsonl" --image-folder "$POPE/val2014" \
    --answers-file "$ANS.jsonl" "${RUN_FLAGS[@]}" --pio-log "$ANS.pio.jsonl" --profile "$ANS.profile.jsonl" \
    --resume

"$PYTHON" -m llava.eval.eval_pope --annotation-dir "$POPE/coco" --question-file "$POPE/llava_pope_test.jsonl" \
    --result-file "$ANS.jsonl" \
    --result-json "$POPE/results/$CKPT.json" --model "$CKPT" --schedule "$SCHEDULE_TEXT" \
    --pio-log "$ANS.pio.jsonl" --wall-time "$WALL_TIME"
