#!/usr/bin/env bash
# CPU demo of the whole loop (make demo): a tiny random LLaVA-1.5 checkpoint, the miniature benchmarks,
# POPE and GQA without pruning, with PIO and with FastV, then the summary table and its plots, and a picture of
# the tokens each method keeps on one image. Numbers are meaningless (random
# weights); the point is that every step runs. Output: demo_out/ (DEMO_OUT), rewritten each time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${DEMO_OUT:-demo_out}"
CKPT_DIR="$OUT/ckpt/llava-v1.5-tiny"
export DATA_ROOT="$OUT/data/eval" MODEL_PATH="$CKPT_DIR" DEVICE=cpu CUDA_VISIBLE_DEVICES=
# A random model rarely stops on its own; keep its answers short.
export EXTRA_ARGS="${EXTRA_ARGS:---max_new_tokens 8}"
BASELINE=llava-v1.5-tiny  # the CKPT name the scripts derive for PIO=none

unset CKPT PIO PIO_ARGS METHOD BUDGET METHOD_ARGS  # each run below names itself
rm -rf "$CKPT_DIR" "$DATA_ROOT"  # only what this script creates
"$PYTHON" -m llava.model.tiny --arch llava-v1.5 --out "$CKPT_DIR"
"$PYTHON" -m llava.eval.fixtures --out "$DATA_ROOT"

for bench in pope gqa; do
    bash scripts/v1_5/eval/$bench.sh
    # The tiny model has 4 decoder layers, too few for the paper's stages: the paper's 192-token budget with
    # PIO after layers 1 and 2, and FastV after layer 1.
    METHOD=pio BUDGET=192 METHOD_ARGS="--layers 1,2" bash scripts/v1_5/eval/$bench.sh
    METHOD=fastv BUDGET=192 METHOD_ARGS="--layers 1" bash scripts/v1_5/eval/$bench.sh
done

echo
"$PYTHON" -m llava.eval.summarize --data-root "$DATA_ROOT" --baseline "$BASELINE" --plot "$OUT/plots" \
    --out-md "$OUT/table.md"

# Which tokens each method keeps on one demo image (the paper's budget 192; stages moved to the tiny model's
# layers as above): PIO, a text-to-image attention method, a diversity method and a CLS-attention method.
IMAGE="$(ls "$DATA_ROOT"/pope/val2014/*.jpg | head -n 1)"
"$PYTHON" -m llava.eval.visualize --model-path "$CKPT_DIR" --image-file "$IMAGE" --device cpu \
    --query "Is there a triangle in the image?" --methods pio@1/2,fastv@1,dart@1,visionzip --budget 192 \
    --out "$OUT/kept_tokens.png" > /dev/null
echo
echo "checkpoint:   $CKPT_DIR"
echo "benchmarks:   $DATA_ROOT (miniature; python -m llava.eval.fixtures)"
echo "answers:      $DATA_ROOT/{pope,gqa}/answers/"
echo "result JSONs: $DATA_ROOT/{pope,gqa}/results/"
echo "table, plots: $OUT/table.md, $OUT/plots/"
echo "kept tokens:  $OUT/kept_tokens.png (python -m llava.eval.visualize)"
