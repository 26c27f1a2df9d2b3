# shellcheck shell=bash
# Command construction for the SLURM scripts (sourced, never executed). Every function PRINTS the
# command, one argument per line, so tests can check it with a fake SLURM environment; the
# dllm2rec_exec helper runs a printed command. Variables read (defaults in brackets):
#   SLURM_JOB_NODELIST, SLURM_NNODES [1], SLURM_NODEID [0], SLURM_JOB_ID, SLURM_ARRAY_TASK_ID
#   GPUS_PER_NODE   processes per node [1]          MAIN_PORT       rendezvous port [29500]
#   DEVICE          gpu | cpu [gpu]; cpu adds ACCELERATE_USE_CPU=1 (gloo) -- see PLATFORM notes
#   ACCELERATE_CONFIG  an accelerate YAML (e.g. launch/accelerate_zero2.yaml) [none: plain DDP]
#   PYTHON          interpreter that runs `-m dllm2rec` (torchrun variant) [python]

dllm2rec_head_node() {
    # First host of the allocation: the rendezvous endpoint for every node.
    scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set (run inside an allocation)}" | head -n 1
}

_dllm2rec_world() {
    echo $(( ${SLURM_NNODES:-1} * ${GPUS_PER_NODE:-1} ))
}

# accelerate launch for THIS node; must run inside the srun task (SLURM_NODEID differs per node).
# Arguments after the function name are passed to `python -m dllm2rec train`; --resume is always
# added so that a requeued job continues from <output_dir>/checkpoints/last.
dllm2rec_accelerate_cmd() {
    local head nnodes port
    head="$(dllm2rec_head_node)" || return 1
    nnodes="${SLURM_NNODES:-1}"
    port="${MAIN_PORT:-29500}"
    if [ "${DEVICE:-gpu}" = "cpu" ]; then
        printf '%s\n' env ACCELERATE_USE_CPU=1
    fi
    printf '%s\n' accelerate launch
    if [ -n "${ACCELERATE_CONFIG:-}" ]; then
        printf '%s\n' --config_file "${ACCELERATE_CONFIG}"
        if [ "${nnodes}" -gt 1 ] && grep -q 'distributed_type: DEEPSPEED' "${ACCELERATE_CONFIG}" 2>/dev/null; then
            printf '%s\n' --deepspeed_multinode_launcher standard
        fi
    else
        printf '%s\n' --multi_gpu
    fi
    printf '%s\n' --num_machines "${nnodes}" --machine_rank "${SLURM_NODEID:-0}" \
        --num_processes "$(_dllm2rec_world)" --main_process_ip "${head}" --main_process_port "${port}" \
        --rdzv_backend c10d --same_network \
        -m dllm2rec train "$@" --resume
}

# torchrun for THIS node (c10d rendezvous needs no machine rank: torchrun assigns it).
dllm2rec_torchrun_cmd() {
    local head
    head="$(dllm2rec_head_node)" || return 1
    if [ "${DEVICE:-gpu}" = "cpu" ]; then
        printf '%s\n' env ACCELERATE_USE_CPU=1
    fi
    printf '%s\n' torchrun --nnodes "${SLURM_NNODES:-1}" --nproc_per_node "${GPUS_PER_NODE:-1}" \
        --rdzv_backend c10d --rdzv_endpoint "${head}:${MAIN_PORT:-29500}" --rdzv_id "${SLURM_JOB_ID:-dllm2rec}" \
        -m dllm2rec train "$@" --resume
}

# One array task = one independent run: line SLURM_ARRAY_TASK_ID (0-based, '#' comments and
# blank lines skipped) of RUN_LIST holds "<config.yaml> [overrides...]"; the task's output_dir is
# suffixed with the task id unless the line sets train.output_dir itself.
dllm2rec_array_args() {
    local list="${RUN_LIST:?RUN_LIST (a file of '<config> [overrides]' lines) is not set}"
    local task="${SLURM_ARRAY_TASK_ID:?SLURM_ARRAY_TASK_ID is not set (submit with --array)}"
    local line
    line="$(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "${list}" | sed -n "$((task + 1))p")"
    if [ -z "${line}" ]; then
        echo "dllm2rec: ${list} has no run for array task ${task}" >&2
        return 1
    fi
    # shellcheck disable=SC2086  # word splitting of the line is intended
    set -- ${line}
    printf '%s\n' --config "$1"
    shift
    if [ "$#" -gt 0 ]; then printf '%s\n' "$@"; fi
    case " ${line} " in
        *" train.output_dir="*) ;;
        *) printf '%s\n' "train.output_dir=runs/array/${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-job}}_${task}" ;;
    esac
}

# Run a command printed by one of the functions above (one argument per line).
dllm2rec_exec() {
    local -a cmd
    mapfile -t cmd < <("$@")
    if [ "${#cmd[@]}" -eq 0 ]; then
        echo "dllm2rec: empty command from $1" >&2
        return 1
    fi
    echo "[node ${SLURM_NODEID:-0}] ${cmd[*]}" >&2
    exec "${cmd[@]}"
}
