# Shared helpers for scripts/{v1_5,next,qwen2_5_vl}/eval/*.sh. Sourced, not run.
#
# Environment read by eval_init (every value has a default):
#   MODEL_PATH   checkpoint dir or hub id           (default: the script's model)
#   METHOD       none, a reduction method (pio fastv pdrop sparsevlm dart random; before the LLM: visionzip holov
#                scope divprune scan) or an encoder-side one + an in-LLM one (scan+pio: the paper's "w/ VE")
#   BUDGET       the paper's budget for METHOD: 64 | 128 | 192 (average visual tokens per layer of 576)
#   METHOD_ARGS  more reduction flags, e.g. "--layers 3" or "--tokens 68" (instead of or beside BUDGET)
#   PIO          legacy spelling: none | 64 | 128 | 192 (= METHOD=pio BUDGET=...) | custom (PIO_ARGS)
#   PIO_ARGS     runner flags for PIO=custom, e.g. "--pio-layers 1,10,15 --pio-tokens 92,54,22"
#   SCHEDULE     a schedule file of python -m llava.eval.tune (its method, layers, counts; instead of BUDGET)
#   CKPT         name used in output paths           (default: basename of MODEL_PATH + method tag)
#   DATA_ROOT    benchmark root                      (default ./playground/data/eval)
#   DEVICE DTYPE runner --device / --dtype           (default empty: the runner decides)
#   BATCH_SIZE   runner --batch-size: questions per forward pass (default empty: 1); more memory per step,
#                the same answers (a batch that does not fit is split and retried)
#   CONV_MODE    conversation template               (default vicuna_v1; qwen2_5_vl in scripts/qwen2_5_vl)
#   MIN_PIXELS MAX_PIXELS  Qwen2.5-VL image area bounds (default: the runner's, 1008*1008 both)
#   EXTRA_ARGS   more runner flags, word-split       (default empty; the runners always --resume the same run:
#                                                    EXTRA_ARGS=--overwrite replaces a different earlier one)
#   PYTHON       interpreter                         (default: the project's .venv/bin/python when there is
#                                                    one, else python)
#   CUDA_VISIBLE_DEVICES  chunked benchmarks run one chunk per listed GPU
#   NPROC_PER_NODE  chunked benchmarks (GQA, TextVQA, VQAv2) run under torchrun instead, this many ranks per node,
#                each on cuda:LOCAL_RANK of the visible GPUs (the other benchmarks run one process)
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT  several nodes: the same command on each, NODE_RANK 0..NNODES-1,
#                MASTER_ADDR node 0's address (MASTER_PORT default 29500); DATA_ROOT on a shared file system:
#                node 0 merges every rank's answers and scores, the other nodes stop after their ranks

PIO_CHOICES="none 64 128 192 custom"

# _tag_of "WORDS": "--layers 1,10,15 --tokens 92,54,22" -> "layers=1,10,15 tokens=92,54,22" (TAG_TEXT) and
# "layers-1_10_15-tokens-92_54_22" (TAG_NAME); a leading "pio-" of a flag is dropped.
_tag_of() {
    local words w i text=""
    read -r -a words <<< "$1"
    for ((i = 0; i < ${#words[@]}; i++)); do
        w="${words[i]}"
        if [[ "$w" == --* && $((i + 1)) -lt ${#words[@]} && "${words[i + 1]}" != --* ]]; then
            w="${w#--}"; w="${w#pio-}=${words[i + 1]}"; i=$((i + 1))
        else
            w="${w#--}"; w="${w#pio-}"
        fi
        text+="${text:+ }$w"
    done
    TAG_TEXT="$text"
    TAG_NAME="${text// /-}"; TAG_NAME="${TAG_NAME//=/-}"; TAG_NAME="${TAG_NAME//,/_}"
    TAG_NAME="${TAG_NAME//[^A-Za-z0-9._-]/}"
}

# method_resolve METHOD BUDGET METHOD_ARGS PIO PIO_ARGS -> METHOD_FLAGS (array), METHOD_TAG, SCHEDULE_TEXT.
# Returns 2 on a bad combination.
method_resolve() {
    local method="${1:-none}" budget="${2:-}" margs="${3:-}" pio="${4:-none}" pargs="${5:-}" words
    METHOD_FLAGS=()
    METHOD_TAG=""
    SCHEDULE_TEXT="none"
    if [[ "$pio" != none ]]; then
        if [[ "$method" != none || -n "$budget" || -n "$margs" ]]; then
            echo "error: give METHOD/BUDGET/METHOD_ARGS or the legacy PIO, not both (PIO=$pio METHOD=$method)" >&2
            return 2
        fi
        case "$pio" in
            64 | 128 | 192) method=pio; budget="$pio" ;;
            custom)
                read -r -a words <<< "$pargs"
                if (( ${#words[@]} == 0 )); then
                    echo "error: PIO=custom needs PIO_ARGS, e.g." \
                         "PIO_ARGS=\"--pio-layers 1,10,15 --pio-tokens 92,54,22\"" >&2
                    return 2
                fi
                method=pio; margs="$pargs" ;;
            *)
                echo "error: PIO='$pio' is not one of: $PIO_CHOICES" \
                     "(64/128/192 are the paper's budgets; custom uses PIO_ARGS; other methods: METHOD=...)" >&2
                return 2 ;;
        esac
    fi
    if [[ "$method" == none ]]; then
        if [[ -n "$budget" || -n "$margs" ]]; then
            echo "error: BUDGET/METHOD_ARGS need METHOD=pio|fastv|...|visionzip|...|scan+pio" >&2
            return 2
        fi
        return 0
    fi
    if [[ ! "$method" =~ ^[a-z0-9_]+(\+[a-z0-9_]+)?$ ]]; then
        echo "error: METHOD='$method' is not a method name or an encoder+LLM pair (pio, fastv, visionzip," \
             "scan+pio, ...; or none)" >&2
        return 2
    fi
    if [[ -z "$budget" && -z "$margs" ]]; then
        echo "error: METHOD=$method needs BUDGET=64|128|192 (the paper's budgets) or METHOD_ARGS" >&2
        return 2
    fi
    if [[ -n "$budget" && ! "$budget" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
        echo "error: BUDGET='$budget' is not a number (the paper's budgets: 64 128 192)" >&2
        return 2
    fi
    METHOD_FLAGS=(--method "$method")
    if [[ -n "$budget" ]]; then METHOD_FLAGS+=(--budget "$budget"); fi
    read -r -a words <<< "$margs"
    METHOD_FLAGS+=("${words[@]+"${words[@]}"}")
    _tag_of "$margs"
    METHOD_TAG="-$method$budget${TAG_NAME:+-$TAG_NAME}"
    SCHEDULE_TEXT="$method${budget:+ budget=$budget}${TAG_TEXT:+ $TAG_TEXT}"
}

# schedule_resolve FILE METHOD -> METHOD_FLAGS, METHOD_TAG, SCHEDULE_TEXT for a tuned schedule file (the runner
# reads its method, layers and counts; METHOD, when given, must be the file's). Returns 2 on a bad combination.
schedule_resolve() {
    local file="$1" method="$2" stem
    if [[ -n "${BUDGET:-}" || -n "${METHOD_ARGS:-}" || "${PIO:-none}" != none ]]; then
        echo "error: SCHEDULE=$file gives the method's layers and counts; drop BUDGET/METHOD_ARGS/PIO" >&2
        return 2
    fi
    if [[ ! -f "$file" ]]; then
        echo "error: SCHEDULE=$file: no such file (write one with python -m llava.eval.tune)" >&2
        return 2
    fi
    METHOD_FLAGS=(--schedule-file "$file")
    if [[ -n "$method" && "$method" != none ]]; then METHOD_FLAGS+=(--method "$method"); fi
    stem="$(basename "$file")"; stem="${stem%%.*}"
    METHOD_TAG="-tuned-${stem//[^A-Za-z0-9._-]/}"
    SCHEDULE_TEXT="tuned schedule $file"
}

# gpu_chunks -> GPULIST (array of CUDA_VISIBLE_DEVICES entries, maybe empty), CHUNKS (>= 1).
gpu_chunks() {
    local cvd="${CUDA_VISIBLE_DEVICES:-}"
    cvd="${cvd//[[:space:]]/}"
    GPULIST=()
    if [[ -n "$cvd" ]]; then IFS=',' read -r -a GPULIST <<< "$cvd"; fi
    local g kept=()
    for g in "${GPULIST[@]+"${GPULIST[@]}"}"; do
        if [[ -n "$g" ]]; then kept+=("$g"); fi
    done
    GPULIST=("${kept[@]+"${kept[@]}"}")
    CHUNKS=${#GPULIST[@]}
    (( CHUNKS > 0 )) || CHUNKS=1
}

# launch_init: NPROC_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT -> LAUNCH_ARGS (torchrun's own arguments;
# empty without NPROC_PER_NODE) and, under torchrun, CHUNKS = the world size. Returns 2 on a bad value.
launch_init() {
    local nproc="${NPROC_PER_NODE:-}" nnodes="${NNODES:-1}" rank="${NODE_RANK:-}" port="${MASTER_PORT:-29500}"
    LAUNCH_ARGS=()
    if [[ -z "$nproc" ]]; then
        if [[ -n "${NNODES:-}${NODE_RANK:-}" ]]; then
            echo "error: NNODES/NODE_RANK need NPROC_PER_NODE (the processes per node torchrun starts)" >&2
            return 2
        fi
        return 0
    fi
    if [[ ! "$nproc" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: NPROC_PER_NODE='$nproc' is not a whole number >= 1 (processes per node, e.g. 8)" >&2
        return 2
    fi
    if [[ ! "$nnodes" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: NNODES='$nnodes' is not a whole number >= 1 (nodes of the launch)" >&2
        return 2
    fi
    if (( ${#GPULIST[@]} > 0 && nproc > ${#GPULIST[@]} )); then
        echo "error: NPROC_PER_NODE=$nproc but CUDA_VISIBLE_DEVICES lists ${#GPULIST[@]} GPU(s); at most one" \
             "process per GPU" >&2
        return 2
    fi
    if (( nnodes == 1 )); then
        if [[ -n "$rank" && "$rank" != 0 ]]; then
            echo "error: NODE_RANK='$rank' with NNODES=1 (the only node is 0)" >&2
            return 2
        fi
        LAUNCH_ARGS=(--standalone --nproc_per_node "$nproc")  # a free local port: launches side by side
    else
        if [[ ! "$rank" =~ ^[0-9]+$ ]] || (( 10#$rank >= nnodes )); then
            echo "error: NODE_RANK='$rank' is not one of 0..$((nnodes - 1)) (NNODES=$nnodes: give each node its" \
                 "own NODE_RANK)" >&2
            return 2
        fi
        if [[ -z "${MASTER_ADDR:-}" ]]; then
            echo "error: NNODES=$nnodes needs MASTER_ADDR (node 0's address, the same on every node)" >&2
            return 2
        fi
        if [[ ! "$port" =~ ^[0-9]+$ ]] || (( 10#$port < 1 || 10#$port > 65535 )); then
            echo "error: MASTER_PORT='$port' is not a port number (1..65535)" >&2
            return 2
        fi
        LAUNCH_ARGS=(--nnodes "$nnodes" --node_rank "$((10#$rank))" --master_addr "$MASTER_ADDR" --master_port "$port"
                     --nproc_per_node "$nproc")
    fi
    CHUNKS=$((nnodes * nproc))
}

# eval_init DEFAULT_MODEL_PATH: resolve the environment into MODEL_PATH CKPT DATA_ROOT PYTHON CONV_MODE
# SCHEDULE_TEXT and RUN_FLAGS (flags for every runner: model, decoding, device, dtype, method, then EXTRA_ARGS,
# so put RUN_FLAGS after a runner's own flags and EXTRA_ARGS can override them).
eval_init() {
    MODEL_PATH="${MODEL_PATH:-$1}"
    if [[ -n "${SCHEDULE:-}" ]]; then
        schedule_resolve "$SCHEDULE" "${METHOD:-}" || exit 2
    else
        method_resolve "${METHOD:-none}" "${BUDGET:-}" "${METHOD_ARGS:-}" "${PIO:-none}" "${PIO_ARGS:-}" || exit 2
    fi
    local base="${MODEL_PATH%/}"
    CKPT="${CKPT:-${base##*/}$METHOD_TAG}"
    DATA_ROOT="${DATA_ROOT:-./playground/data/eval}"
    local venv
    venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x "$venv" ]]; then PYTHON="$venv"; else PYTHON=python; fi
    fi
    CONV_MODE="${CONV_MODE:-vicuna_v1}"
    RUN_FLAGS=(--model-path "$MODEL_PATH" --temperature 0 --conv-mode "$CONV_MODE")
    if [[ -n "${DEVICE:-}" ]]; then RUN_FLAGS+=(--device "$DEVICE"); fi
    if [[ -n "${DTYPE:-}" ]]; then RUN_FLAGS+=(--dtype "$DTYPE"); fi
    if [[ -n "${BATCH_SIZE:-}" ]]; then RUN_FLAGS+=(--batch-size "$BATCH_SIZE"); fi
    if [[ -n "${MIN_PIXELS:-}" ]]; then RUN_FLAGS+=(--min-pixels "$MIN_PIXELS"); fi
    if [[ -n "${MAX_PIXELS:-}" ]]; then RUN_FLAGS+=(--max-pixels "$MAX_PIXELS"); fi
    RUN_FLAGS+=("${METHOD_FLAGS[@]+"${METHOD_FLAGS[@]}"}")
    local extra=()
    read -r -a extra <<< "${EXTRA_ARGS:-}"
    RUN_FLAGS+=("${extra[@]+"${extra[@]}"}")
    gpu_chunks
    launch_init || exit 2
    echo "== $(basename "$0" .sh): model=$MODEL_PATH ckpt=$CKPT method=$SCHEDULE_TEXT data=$DATA_ROOT" >&2
    if [[ -n "${LAUNCH_ARGS[*]:-}" ]]; then
        echo "== torchrun ${LAUNCH_ARGS[*]}: $CHUNKS ranks for a chunked benchmark (GQA, TextVQA, VQAv2); the" \
             "others run one process" >&2
    fi
}

# timed CMD...: run CMD, then set WALL_TIME to its wall-clock seconds.
timed() {
    local t0
    t0=$(date +%s)
    "$@"
    WALL_TIME=$(( $(date +%s) - t0 ))
}

# merge_chunks DIR: concatenate DIR/${CHUNKS}_${IDX}{.jsonl,.pio.jsonl,.profile.jsonl} in index order into
# DIR/merge{.jsonl,.pio.jsonl,.profile.jsonl}. Answer files must all exist, and every chunk's run file must say
# that its last invocation finished (a rank of another node may still run, or have died); logs are merged where
# present. The run description (the same in every chunk) becomes DIR/merge.run.json. Each merged file is written
# under a temporary name and renamed into place, so two scripts merging the same chunks at once (both finishing a
# resumed launch) each replace it whole and a reader never sees half a file.
merge_chunks() {
    local dir="$1" kind idx f last tmp
    for ((idx = 0; idx < CHUNKS; idx++)); do
        f="$dir/${CHUNKS}_${idx}.run.json"
        last="$(grep -o '"finished": *[a-z]*' "$f" 2>/dev/null | tail -n 1 || true)"
        if [[ -n "$last" && "$last" != *true ]]; then
            echo "error: chunk $idx of $CHUNKS has not finished ($f: last invocation finished=${last##* }; still" \
                 "running or died): rerun the launch, it resumes" >&2
            return 1
        fi
    done
    rm -f "$dir/merge.run.json"
    for ((idx = 0; idx < CHUNKS; idx++)); do
        f="$dir/${CHUNKS}_${idx}.run.json"
        if [[ -f "$f" ]]; then cp "$f" "$dir/.merge.run.json.$BASHPID" && mv -f "$dir/.merge.run.json.$BASHPID" "$dir/merge.run.json"; break; fi
    done
    for kind in "" .pio .profile; do
        tmp="$dir/.merge$kind.jsonl.$BASHPID"
        : > "$tmp"
        for ((idx = 0; idx < CHUNKS; idx++)); do
            f="$dir/${CHUNKS}_${idx}$kind.jsonl"
            if [[ -f "$f" ]]; then
                cat "$f" >> "$tmp"
            elif [[ -z "$kind" ]]; then
                rm -f "$tmp"
                echo "error: chunk $idx wrote no answers file $f" >&2
                return 1
            fi
        done
        mv -f "$tmp" "$dir/merge$kind.jsonl"
    done
}

# torchrun_chunks DIR PYTHON -m MODULE ARGS...: MODULE under torchrun (LAUNCH_ARGS), each rank answering its chunk
# into DIR/${CHUNKS}_<rank>{.jsonl,.pio.jsonl,.profile.jsonl} (the runner fills in {rank}); once torchrun returns,
# node 0 runs merge_chunks DIR and the other nodes end the script (node 0 merges and scores).
torchrun_chunks() {
    local dir="$1" python="$2" prefix="$1/${CHUNKS}_{rank}"
    shift 2
    if ! "$python" -m torch.distributed.run "${LAUNCH_ARGS[@]}" "$@" --answers-file "$prefix.jsonl" \
            --pio-log "$prefix.pio.jsonl" --profile "$prefix.profile.jsonl"; then
        echo "error: torchrun ${LAUNCH_ARGS[*]} failed (the ranks' errors are above); rerun it to resume" >&2
        return 1
    fi
    if (( 10#${NODE_RANK:-0} > 0 )); then
        echo "== node $NODE_RANK of $NNODES: its ranks are done; node 0 merges the answers and scores" >&2
        exit 0
    fi
    merge_chunks "$dir"
}

# run_chunks DIR CMD...: with NPROC_PER_NODE, torchrun_chunks DIR CMD...; else run CMD once per chunk in parallel
# (CUDA_VISIBLE_DEVICES = that chunk's GPU when a GPU list is set), adding --num-chunks --chunk-idx --answers-file
# --pio-log --profile per chunk; wait for all, fail if any failed, then merge_chunks DIR.
run_chunks() {
    local dir="$1" idx failed=0 prefix
    shift
    mkdir -p "$dir"
    if [[ -n "${LAUNCH_ARGS[*]:-}" ]]; then
        torchrun_chunks "$dir" "$@"
        return
    fi
    local pids=()
    for ((idx = 0; idx < CHUNKS; idx++)); do
        prefix="$dir/${CHUNKS}_${idx}"
        (
            if (( ${#GPULIST[@]} > 0 )); then export CUDA_VISIBLE_DEVICES="${GPULIST[idx]}"; fi
            exec "$@" --num-chunks "$CHUNKS" --chunk-idx "$idx" --answers-file "$prefix.jsonl" \
                --pio-log "$prefix.pio.jsonl" --profile "$prefix.profile.jsonl"
        ) &
        pids+=($!)
    done
    for ((idx = 0; idx < CHUNKS; idx++)); do
        if ! wait "${pids[idx]}"; then
            echo "error: chunk $idx of $CHUNKS failed" >&2
            failed=1
        fi
    done
    (( failed == 0 )) || return 1
    merge_chunks "$dir"
}
