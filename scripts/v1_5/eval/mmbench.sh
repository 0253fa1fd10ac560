#!/usr/bin/env bash
# MMBench dev (EN; CN with MMBENCH_LANG=cn), LLaVA-1.5; score = CircularEval accuracy over the TSV's rotated
# rows. Also writes the submission table. Settings: see scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
eval_init liuhaotian/llava-v1.5-7b

# MMBENCH_LANG=cn selects MMBench-CN (scripts/*/eval/mmbench_cn.sh set it)
case "${MMBENCH_LANG:-en}" in
    en) SPLIT=mmbench_dev_20230712; MMB="$DATA_ROOT/mmbench" ;;
    cn) SPLIT=mmbench_dev_cn_20231003; MMB="$DATA_ROOT/mmbench_cn" ;;
    *) echo "error: MMBENCH_LANG='$MMBENCH_LANG' is not one of: en cn" >&2; exit 2 ;;
esac
ANS="$MMB/answers/$SPLIT/$CKPT"
mkdir -p "$MMB/answers/$SPLIT" "$MMB/answers_upload/$SPLIT"

timed "$PYTHON" -m llava.eval.model_vqa_mmbench --question-file "$MMB/$SPLIT.tsv" \
    --answers-file "$ANS.jsonl" --single-pred-prompt --lang "${MMBENCH_LANG:-en}" "${RUN_FLAGS[@]}" \
    --pio-log "$ANS.pio.jsonl" --profile "$ANS.profile.jsonl" --resume

"$PYTHON" -m llava.eval.eval_mmbench --annotation-file "$MMB/$SPLIT.tsv" --result-file "$ANS.jsonl" \
    --lang "${MMBENCH_LANG:-en}" \
    --convert-out "$MMB/answers_upload/$SPLIT/$CKPT.xlsx" \
    --result-json "$MMB/results/$CKPT.json" --model "$CKPT" --schedule "$SCHEDULE_TEXT" \
    --pio-log "$ANS.pio.jsonl" --wall-time "$WALL_TIME"
