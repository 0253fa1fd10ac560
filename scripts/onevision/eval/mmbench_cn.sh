#!/usr/bin/env bash
# mmbench_cn: scripts/v1_5/eval/mmbench_cn.sh with LLaVA-OneVision-7B (lmms-lab/llava-onevision-qwen2-7b-ov, the original layout;
# the converted llava-hf/llava-onevision-qwen2-7b-ov-hf loads too) as the default model. Prompts use LLaVA-NeXT's
# qwen_1_5 template (CONV_MODE=qwen_1_5); images as its anyres_max_9 processor makes them; methods take their
# OneVision defaults (docs/methods.md: LLaVA's layers at the same share of the 28 layers; VFlowOpt's own strategy
# for METHOD=vflowopt_vit+vflowopt). Settings: see scripts/common.sh.
set -euo pipefail
export MODEL_PATH="${MODEL_PATH:-lmms-lab/llava-onevision-qwen2-7b-ov}"
export CONV_MODE="${CONV_MODE:-qwen_1_5}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/mmbench_cn.sh" "$@"
