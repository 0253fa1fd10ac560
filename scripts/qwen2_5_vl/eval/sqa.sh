#!/usr/bin/env bash
# sqa: scripts/v1_5/eval/sqa.sh with Qwen2.5-VL-7B-Instruct as the default model. Prompts use Qwen's chat format
# (CONV_MODE=qwen2_5_vl); images at the PIO authors' resolution, min = max pixels = 1008^2 (MIN_PIXELS, MAX_PIXELS
# change it); methods take their Qwen defaults (PIO: layers 1, 8, 14). Settings: see scripts/common.sh.
set -euo pipefail
export MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-VL-7B-Instruct}"
export CONV_MODE="${CONV_MODE:-qwen2_5_vl}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/sqa.sh" "$@"
