#!/usr/bin/env bash
# One node's part of a SLURM job (srun starts it once per node, from job.sh): `accelerate launch` with this
# node's machine rank and the job's main address and port, all taken from SLURM's variables, then the exit
# code that asks for a requeue (75) when the run stopped on a signal (docs/cluster.md).
#   OUTPUT_DIR  the run's output_dir (required; on a filesystem every node sees)
#   ACCELERATE_ARGS  more `accelerate launch` options, e.g. "--mixed_precision bf16" or "--config_file ..."
#   GPUS_PER_NODE    processes per node (default: SLURM_GPUS_ON_NODE)
#   MAIN_PORT        the rendezvous port (default: 20000 + job id mod 20000, so jobs sharing a node differ)
#   DRY_RUN=1        print the launch line and stop
# Arguments: the script and its arguments, e.g. pretrain/main.py --config configs/... key=value
set -uo pipefail
: "${OUTPUT_DIR:?set OUTPUT_DIR to the output_dir of the run}"
nodes=${SLURM_NNODES:?not inside a SLURM job (SLURM_NNODES is unset)}
per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:?set GPUS_PER_NODE (SLURM_GPUS_ON_NODE is unset)}}
main_address=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
processes=$((nodes * per_node))

# shellcheck disable=SC2206  # ACCELERATE_ARGS is a list of options
launch=(accelerate launch --num_machines "$nodes" --machine_rank "$SLURM_NODEID" --num_processes "$processes"
        --main_process_ip "$main_address" --main_process_port "$port" --rdzv_backend static
        $([ "$processes" -gt 1 ] && echo --multi_gpu) ${ACCELERATE_ARGS:-}
        "$@" "output_dir=$OUTPUT_DIR" resume=auto)
if [ -n "${DRY_RUN:-}" ]; then
    echo "${launch[*]}"
    exit 0
fi

# The ranks stop on SIGUSR1 and SIGTERM themselves (train.stop_signals). The launcher must outlive them: it
# inherits the ignore below and torchrun is told not to catch SIGTERM (it would kill the ranks after 30 s).
trap '' USR1 TERM
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
"${launch[@]}"
code=$?
# accelerate launch reports a rank's exit code 75 as 1; the marker that rank 0 leaves tells them apart.
if [ -f "$OUTPUT_DIR/requeue.json" ]; then
    exit 75
fi
exit "$code"
