#!/usr/bin/env bash
# MMBench dev (EN), LLaVA-1.5; score = CircularEval accuracy over the TSV's rotated rows. Also writes the
# submission table. Settings: see scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
eval_init liuhaotian/llava-v1.5-7b

SPLIT=mmbench_dev_20230712
MMB="$DATA_ROOT/mmbench"
ANS="$MMB/answers/$SPLIT/$CKPT"
mkdir -p "$MMB/answers/$SPLIT" "$MMB/answers_upload/$SPLIT"

timed "$PYTHON" -m llava.eval.model_vqa_mmbench --question-file "$MMB/$SPLIT.tsv" \
    --answers-file "$ANS.jsonl" --single-pred-prompt --lang en "${RUN_FLAGS[@]}" \
    --pio-log "$ANS.pio.jsonl" --profile "$ANS.profile.jsonl" --resume

"$PYTHON" -m llava.eval.eval_mmbench --annotation-file "$MMB/$SPLIT.tsv" --result-file "$ANS.jsonl" --lang en \
    --convert-out "$MMB/answers_upload/$SPLIT/$CKPT.xlsx" \
    --result-json "$MMB/results/$CKPT.json" --model "$CKPT" --schedule "$SCHEDULE_TEXT" \
    --pio-log "$ANS.pio.jsonl" --wall-time "$WALL_TIME"
