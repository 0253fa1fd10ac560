#!/usr/bin/env bash
# Video-MME (multiple choice, without subtitles; score = accuracy over every question), Qwen2.5-VL-7B-Instruct.
# Frames as qwen-vl-utils samples them: FPS (default 2 frames per second, 4 to 768 frames) or NUM_FRAMES, each frame
# within VIDEO_MIN_PIXELS (default 128*28*28) and VIDEO_MAX_PIXELS (default and cap: min(768*28*28, total / frames *
# 2)). Data: $DATA_ROOT/videomme with videomme.json (the official annotation), data/<youtube id>.mp4 and
# llava_videomme.jsonl (README, "Video"). Methods act on all the video's tokens: BUDGET=64 keeps 64/576 of them.
# Settings: see scripts/common.sh; DURATIONS (default short,medium,long) picks what is scored.
set -euo pipefail
export MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-VL-7B-Instruct}"
export CONV_MODE="${CONV_MODE:-qwen2_5_vl}"
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
eval_init Qwen/Qwen2.5-VL-7B-Instruct

VMME="$DATA_ROOT/videomme"
ANS="$VMME/answers/$CKPT"
mkdir -p "$VMME/answers"
VIDEO_FLAGS=()
if [[ -n "${NUM_FRAMES:-}" ]]; then VIDEO_FLAGS+=(--num-frames "$NUM_FRAMES"); fi
if [[ -n "${FPS:-}" ]]; then VIDEO_FLAGS+=(--fps "$FPS"); fi
if [[ -n "${VIDEO_MIN_PIXELS:-}" ]]; then VIDEO_FLAGS+=(--video-min-pixels "$VIDEO_MIN_PIXELS"); fi
if [[ -n "${VIDEO_MAX_PIXELS:-}" ]]; then VIDEO_FLAGS+=(--video-max-pixels "$VIDEO_MAX_PIXELS"); fi

# max_new_tokens 16: lmms-eval's videomme task (EXTRA_ARGS may change it)
timed "$PYTHON" -m llava.eval.model_video_qa \
    --question-file "$VMME/llava_videomme.jsonl" --video-folder "$VMME" --max_new_tokens 16 \
    "${VIDEO_FLAGS[@]+"${VIDEO_FLAGS[@]}"}" \
    --answers-file "$ANS.jsonl" "${RUN_FLAGS[@]}" --pio-log "$ANS.pio.jsonl" --profile "$ANS.profile.jsonl" \
    --resume

"$PYTHON" -m llava.eval.eval_videomme --annotation-file "$VMME/videomme.json" --result-file "$ANS.jsonl" \
    --durations "${DURATIONS:-short,medium,long}" \
    --result-json "$VMME/results/$CKPT.json" --model "$CKPT" --schedule "$SCHEDULE_TEXT" \
    --pio-log "$ANS.pio.jsonl" --wall-time "$WALL_TIME"
