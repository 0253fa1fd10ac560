#!/usr/bin/env bash
# ScienceQA test (all 4,241 questions are run; score = IMG accuracy), LLaVA-1.5. Settings: see scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
eval_init liuhaotian/llava-v1.5-7b

SQA="$DATA_ROOT/scienceqa"
ANS="$SQA/answers/$CKPT"
mkdir -p "$SQA/answers"

timed "$PYTHON" -m llava.eval.model_vqa_science \
    --question-file "$SQA/llava_test_CQM-A.json" --image-folder "$SQA/images/test" \
    --answers-file "$ANS.jsonl" --single-pred-prompt "${RUN_FLAGS[@]}" \
    --pio-log "$ANS.pio.jsonl" --profile "$ANS.profile.jsonl" --resume

"$PYTHON" -m llava.eval.eval_science_qa --base-dir "$SQA" --result-file "$ANS.jsonl" \
    --output-file "${ANS}_output.jsonl" --output-result "${ANS}_result.json" \
    --result-json "$SQA/results/$CKPT.json" --model "$CKPT" --schedule "$SCHEDULE_TEXT" \
    --pio-log "$ANS.pio.jsonl" --wall-time "$WALL_TIME"
