#!/usr/bin/env bash
# MMBench-CN dev, LLaVA-1.5: scripts/v1_5/eval/mmbench.sh on the Chinese TSV. Settings: see scripts/common.sh.
set -euo pipefail
export MMBENCH_LANG=cn
exec bash "$(dirname "${BASH_SOURCE[0]}")/mmbench.sh" "$@"
