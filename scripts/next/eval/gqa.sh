#!/usr/bin/env bash
# GQA testdev-balanced, LLaVA-NeXT (1.6): scripts/v1_5/eval/gqa.sh with a NeXT checkpoint as the default.
# The checkpoint's config selects anyres; PIO presets resolve per-sample budgets inside the runner.
# Settings: see scripts/common.sh.
set -euo pipefail
export MODEL_PATH="${MODEL_PATH:-liuhaotian/llava-v1.6-vicuna-7b}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval/gqa.sh" "$@"
