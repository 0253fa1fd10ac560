#!/usr/bin/env bash
# Video-MME: scripts/qwen2_5_vl/eval/videomme.sh with LLaVA-OneVision-7B (lmms-lab/llava-onevision-qwen2-7b-ov, the
# original layout; the converted llava-hf/llava-onevision-qwen2-7b-ov-hf loads too) as the default model. Frames as
# lmms-eval's llava_onevision samples them: NUM_FRAMES (default 32) at linspace over the video, every frame one
# 384-px view pooled to 14 x 14 tokens, one newline after the video (32 frames: 6273 visual tokens); FPS and the
# VIDEO_*_PIXELS settings belong to Qwen2.5-VL's rule and are refused. Prompts use LLaVA-NeXT's qwen_1_5 template
# (CONV_MODE=qwen_1_5); methods act on all the video's tokens (BUDGET=64 keeps 64/576 of them) with their OneVision
# defaults (docs/methods.md). Settings: see scripts/common.sh; DURATIONS (default short,medium,long).
set -euo pipefail
export MODEL_PATH="${MODEL_PATH:-lmms-lab/llava-onevision-qwen2-7b-ov}"
export CONV_MODE="${CONV_MODE:-qwen_1_5}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../qwen2_5_vl/eval/videomme.sh" "$@"
