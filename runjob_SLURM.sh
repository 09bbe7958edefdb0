#!/bin/bash
# Train an MMDiT on SLURM: one srun task per node, each running torchrun with one worker per GPU,
# all nodes joining one c10d rendezvous. Submit from the repository root:
#
#     sbatch runjob_SLURM.sh                                  # preset $CONFIG (default sd3_256)
#     CONFIG=sd3_512 sbatch --nodes=4 runjob_SLURM.sh train.run_name=stage2 train.lr=5e-5
#
# Arguments are `key=value` config overrides passed to src/train.py. #SBATCH lines are defaults:
# command-line options to sbatch override them (--nodes, --time, --gres, --partition, ...).
#
# Environment knobs (read by this script; pass with `VAR=... sbatch` or `sbatch --export=ALL,VAR=...`):
#   CONFIG           preset name in configs/ or a YAML path                     (sd3_256)
#   NPROC_PER_NODE   workers per node        (GPUs SLURM gave this node: $SLURM_GPUS_ON_NODE, else 1)
#   PYTHON           interpreter             (.venv/bin/python if the repository has one, else python3)
#   TRAIN_SCRIPT     training entry point                                        (src/train.py)
#   MASTER_PORT      rendezvous port on the first node           (20000 + job id % 20000)
#   SHUTDOWN_TIMEOUT seconds torchrun gives workers to save and exit after SIGTERM before SIGKILL
#                    (240; keep it below the --signal lead time, 300 s)
#   REQUEUE_ON_SIGNAL 1: requeue the job after the time-limit signal (1)
#
# Preemption / time limit. `--signal=B:USR1@300` makes SLURM send USR1 to this batch shell 300 s
# before the time limit. The trap below then sends SIGTERM to the job's steps with
# `scancel --signal=TERM` (every process of the step gets it: torchrun and its workers); torchrun's
# agent also forwards SIGTERM to its workers and SIGKILLs them SHUTDOWN_TIMEOUT s later. The trainer must treat
# SIGTERM as "stop at the next step boundary, save a checkpoint, exit" (all ranks agree on stopping with
# a collective, so no rank is left waiting). When the step has ended this script runs
# `scontrol requeue $SLURM_JOB_ID`; the requeued job (same id, SLURM_RESTART_COUNT > 0, same arguments)
# adds `train.resume=auto` and continues from the newest complete checkpoint in the run directory.
# A plain `scancel` (SIGTERM to everything) also lets the trainer save, but does not requeue.
# To start a new stage from a previous one, use `train.init_from=<step dir>` (weights only): on a
# requeue, `train.resume=auto` wins over a `train.resume=<path>` given as an argument.
#
# Outside SLURM (`bash runjob_SLURM.sh key=value ...`) it runs torchrun on this machine alone.
#
#SBATCH --job-name=mmdit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=models/slurm-%x-%j.out

set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"

CONFIG=${CONFIG:-sd3_256}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-src/train.py}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ] 2>/dev/null; then
    NPROC_PER_NODE=${NPROC_PER_NODE:-$SLURM_GPUS_ON_NODE}
else
    NPROC_PER_NODE=${NPROC_PER_NODE:-1}
fi
NNODES=${SLURM_NNODES:-1}
JOB_ID=${SLURM_JOB_ID:-$$}
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
else
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + JOB_ID % 20000))}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
REQUEUE_ON_SIGNAL=${REQUEUE_ON_SIGNAL:-1}
RESTARTS=${SLURM_RESTART_COUNT:-0}

# torchrun reads these (PET_* = its own options; older torch ignores unknown ones)
export PET_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT
if [ -z "${OMP_NUM_THREADS:-}" ]; then  # the node's CPUs shared among its workers
    OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE ))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
fi
export PYTHONUNBUFFERED=1

args=(--config "$CONFIG" "$@")
if [ "$RESTARTS" -gt 0 ]; then
    args+=("train.resume=auto")  # a requeued job continues from the newest complete checkpoint
fi

launch=("$PYTHON" -m torch.distributed.run
    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE"
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$JOB_ID"
    "$TRAIN_SCRIPT" "${args[@]}")

echo "[runjob] $(date -Is) job=$JOB_ID restart=$RESTARTS nodes=$NNODES (${SLURM_JOB_NODELIST:-local})" \
     "nproc_per_node=$NPROC_PER_NODE master=$MASTER_ADDR:$MASTER_PORT python=$PYTHON"
echo "[runjob] ${launch[*]}"

signalled=0
# shellcheck disable=SC2317  # (trap handlers)
on_usr1() {
    signalled=1
    echo "[runjob] $(date -Is) USR1: time limit near; SIGTERM to the training step (checkpoint and exit)"
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        # signal the job's steps (not this shell). Not `kill -TERM <srun>`: srun answers SIGTERM by
        # cancelling the step (SIGKILL after a short grace), which gives no time to save.
        scancel --signal=TERM "$SLURM_JOB_ID" || true
    elif [ -n "${step_pid:-}" ]; then
        kill -TERM "$step_pid" 2>/dev/null || true
    fi
}
# shellcheck disable=SC2317
on_term() {
    # scancel / preemption: SLURM signals the step itself; keep waiting so it can save
    echo "[runjob] $(date -Is) SIGTERM: waiting for the training step to save and exit"
}
trap on_usr1 USR1
trap on_term TERM

if [ -n "${SLURM_JOB_ID:-}" ]; then
    # since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: pass it on explicitly
    srun_opts=(--kill-on-bad-exit=1 --nodes="$NNODES" --ntasks-per-node=1)
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    srun "${srun_opts[@]}" "${launch[@]}" &
else
    "${launch[@]}" &
fi
step_pid=$!

# `wait` returns early (128+signal) when a trapped signal arrives; keep waiting until the step ended
rc=0
while :; do
    set +e; wait "$step_pid"; rc=$?; set -e
    if [ "$rc" -le 128 ]; then break; fi
    if ! kill -0 "$step_pid" 2>/dev/null; then
        # it ended around the signal: its status may still be waiting to be collected
        set +e; wait "$step_pid" 2>/dev/null; r=$?; set -e
        [ "$r" -eq 127 ] || rc=$r
        break
    fi
done
echo "[runjob] $(date -Is) training step exited with code $rc"

if [ "$signalled" = 1 ] && [ "$REQUEUE_ON_SIGNAL" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "[runjob] requeueing job $SLURM_JOB_ID (it resumes with train.resume=auto)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
