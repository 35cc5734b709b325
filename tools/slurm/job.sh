#!/usr/bin/env bash
# What the sbatch scripts run: node.sh once on every node, then a requeue of the job when the run stopped on
# a signal (exit code 75) so that it continues from its checkpoint (resume=auto).
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# The batch shell waits for srun whatever it is sent; the ranks decide (docs/cluster.md).
trap '' USR1 TERM
srun --ntasks-per-node=1 --kill-on-bad-exit=0 tools/slurm/node.sh "$@"
code=$?
if [ "$code" -eq 75 ]; then
    echo "stopped on a signal with a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"
