#!/usr/bin/env bash
# MME (14 subtasks), LLaVA-1.5. MME_SCORE=total (perception+cognition, default) or perception picks the
# headline number. Settings: see scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
eval_init liuhaotian/llava-v1.5-7b

MME="$DATA_ROOT/MME"
ANS="$MME/answers/$CKPT"
mkdir -p "$MME/answers"

timed "$PYTHON" -m llava.eval.model_vqa_loader \
    --question-file "$MME/llava_mme.jsonl" --image-folder "$MME/MME_Benchmark_release_version" \
    --answers-file "$ANS.jsonl" "${RUN_FLAGS[@]}" --pio-log "$ANS.pio.jsonl" --profile "$ANS.profile.jsonl" \
    --resume

"$PYTHON" -m llava.eval.eval_mme --gt-dir "$MME/MME_Benchmark_release_version" --result-file "$ANS.jsonl" \
    --mme-score "${MME_SCORE:-total}" --convert-out "$MME/eval_tool/answers/$CKPT" \
    --result-json "$MME/results/$CKPT.json" --model "$CKPT" --schedule "$SCHEDULE_TEXT" \
    --pio-log "$ANS.pio.jsonl" --wall-time "$WALL_TIME"
