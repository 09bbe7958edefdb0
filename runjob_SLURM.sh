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
#   CONFIG            preset name in configs/ or a YAML path                    (sd3_256)
#   NPROC_PER_NODE    workers per node       (GPUs SLURM gave this node: $SLURM_GPUS_ON_NODE, else 1)
#   PYTHON            interpreter            (.venv/bin/python if the repository has one, else python3)
#   TRAIN_SCRIPT      training entry point                                       (src/train.py)
#   MASTER_PORT       c10d rendezvous port on the first node   (20000 + job id % 10000: 20000-29999)
#                     Linux takes the local ends of outgoing connections from the ephemeral range
#                     (net.ipv4.ip_local_port_range, 32768-60999 by default): a listening port inside it
#                     may already be in use by some connection, and the rendezvous then fails at random.
#                     A port inside the first node's range is refused with an error.
#   SOCKET_IFNAME     network interface for gloo (the loader -> model data path: a full mesh across
#                     nodes) and for NCCL's sockets; exported on every node as GLOO_SOCKET_IFNAME and
#                     NCCL_SOCKET_IFNAME, unless those two are set themselves (then they win). Default,
#                     worked out on each node: the interface that routes to MASTER_ADDR (`ip route get`;
#                     on the first node the interface that carries that address, not lo). Set it when the
#                     nodes have several networks and the fast one is not the one the hostname resolves to.
#   SHUTDOWN_TIMEOUT  seconds torchrun gives its workers after torchrun itself got SIGTERM, before it
#                     SIGKILLs them (240; read only by torch with `--shutdown-timeout`: see SIGTERM below)
#   REQUEUE_ON_SIGNAL 1: requeue the job after the time-limit signal (1)
#
# Time limit (how week-long runs are chained). `--signal=B:USR1@300` makes SLURM send USR1 to this batch
# shell (B:) 300 s before the time limit. The trap below forwards it as `scancel --signal=USR1 <job>`:
# slurmd delivers USR1 to every process of the job's steps on every node, torchrun and its workers.
# torchrun has no USR1 handler (its default action, terminate, would kill the agent and with it the
# workers), so each node's torchrun is started through a wrapper that sets USR1 to *ignored* and then
# execs it: an ignored disposition survives exec, so torchrun ignores USR1 (and so do its workers until
# they install their own handler: src/mmdit/train/runtime.py, where SIGUSR1 and SIGTERM both mean "stop
# at a step boundary, checkpoint, exit 0"). torchrun never starts its own SIGTERM -> SIGKILL shutdown:
# the workers have the whole 300 s for the last step and the save on every torch version, and torchrun
# exits 0 after them. This script then runs `scontrol requeue $SLURM_JOB_ID`; the requeued job (same id,
# SLURM_RESTART_COUNT > 0, same arguments) adds `train.resume=auto` and continues from the newest
# complete checkpoint. Keep the `B:`: without it SLURM signals the steps itself (they still save) but
# this shell never hears of it and does not requeue. A USR1 that comes while the workers are still
# starting up (before their handler exists) is lost: do not start a job within 300 s of its end.
#
# SIGTERM (plain `scancel`, preemption): SLURM sends SIGTERM to every process of the job, and SIGKILL
# after KillWait (scancel) or the partition's GraceTime (preemption). The workers begin their stop at
# once. torchrun handles SIGTERM on every version (SIGTERM, SIGINT, SIGHUP, SIGQUIT raise a
# SignalException in the agent): it sends SIGTERM to the workers, SIGKILLs them after a timeout, and
# exits non-zero (torch/distributed/elastic/agent/server/api.py, SimpleElasticAgent.run -> _shutdown;
# read in the sources of torch 2.4.0 and of the 2.13 installed here):
#   - torch 2.4 and the releases before pytorch PR #172596 (merged March 2026): the timeout is a
#     hard-coded 30 s (PContext.close(death_sig, timeout=30)), too short to save a 1B model with its
#     optimizer state (~19 GB); the handled signals are hard-coded too (no USR1);
#   - newer torch (2.13 here): `--shutdown-timeout`, read from PET_SHUTDOWN_TIMEOUT or
#     TORCH_ELASTIC_SHUTDOWN_TIMEOUT, both exported here from SHUTDOWN_TIMEOUT (old torch ignores them);
#     the handled signals come from TORCHELASTIC_SIGNALS_TO_HANDLE (default SIGTERM,SIGINT,SIGHUP,SIGQUIT:
#     do not add SIGUSR1 to it, or torchrun would turn the time-limit USR1 into its own shutdown).
# So on old torch a SIGTERM leaves min(30 s, SLURM's grace) for the save; the time-limit path above does
# not depend on the torch version. A plain `scancel` does not requeue.
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
MASTER_PORT=${MASTER_PORT:-$((20000 + JOB_ID % 10000))}
if read -r eph_lo eph_hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null \
        && [ "$MASTER_PORT" -ge "$eph_lo" ] && [ "$MASTER_PORT" -le "$eph_hi" ]; then
    echo "[runjob] ERROR: MASTER_PORT=$MASTER_PORT is inside the ephemeral port range $eph_lo-$eph_hi" \
         "(net.ipv4.ip_local_port_range) of $(hostname); unset it or pick one below $eph_lo," \
         "e.g. MASTER_PORT=$((20000 + JOB_ID % 10000))" >&2
    exit 2
fi
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
REQUEUE_ON_SIGNAL=${REQUEUE_ON_SIGNAL:-1}
RESTARTS=${SLURM_RESTART_COUNT:-0}
export MASTER_ADDR MASTER_PORT  # read by node_main on every node (srun passes the environment on)
[ -z "${SOCKET_IFNAME:-}" ] || export SOCKET_IFNAME

# torchrun reads these (PET_* = its own options; torch without --shutdown-timeout ignores both)
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

# ---------------------------------------------------------------- on each node (srun task)
# The interface that reaches $1 from this node: `ip route get`; when $1 is this node's own address the
# route is `local ... dev lo`, and the interface that carries the address is what the other nodes reach.
route_ifname() {
    local addr dev
    addr=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
    [ -n "$addr" ] || return 0
    dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n1)
    if [ "$dev" = lo ]; then
        dev=$(ip -o -4 addr show 2>/dev/null | awk -v a="$addr" '{split($4, p, "/"); if (p[1] == a) print $2}' | head -n1)
    fi
    echo "$dev"
}
# Runs as the srun task on every node: set the socket interfaces, ignore USR1, exec torchrun ("$@").
node_main() {
    local ifname=${SOCKET_IFNAME:-}
    if [ -z "$ifname" ] && { [ -z "${GLOO_SOCKET_IFNAME:-}" ] || [ -z "${NCCL_SOCKET_IFNAME:-}" ]; }; then
        if command -v ip >/dev/null 2>&1; then ifname=$(route_ifname "$MASTER_ADDR"); fi
        [ -n "$ifname" ] || echo "[runjob] $(hostname): no route to MASTER_ADDR=$MASTER_ADDR found;" \
            "GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME left to torch's defaults (set SOCKET_IFNAME=<interface>)" >&2
    fi
    if [ -n "$ifname" ]; then
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$ifname} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$ifname}
    fi
    echo "[runjob] $(hostname): GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-}"
    trap '' USR1  # ignored survives exec: torchrun ignores USR1, the workers install their own handler
    exec "$@"
}
node_cmd=(bash -c "$(declare -f route_ifname node_main); node_main \"\$@\"" node_main "${launch[@]}")

echo "[runjob] $(date -Is) job=$JOB_ID restart=$RESTARTS nodes=$NNODES (${SLURM_JOB_NODELIST:-local})" \
     "nproc_per_node=$NPROC_PER_NODE master=$MASTER_ADDR:$MASTER_PORT python=$PYTHON"
echo "[runjob] ${launch[*]}"

signalled=0
# shellcheck disable=SC2317  # (trap handlers)
on_usr1() {
    signalled=1
    echo "[runjob] $(date -Is) USR1: time limit near; USR1 to the training step (checkpoint and exit)"
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        # every process of the job's steps, not this shell. Not `kill <srun>`: srun answers SIGTERM/SIGINT
        # by cancelling the step (SIGKILL after a short grace), which gives no time to save.
        scancel --signal=USR1 "$SLURM_JOB_ID" || true
    elif [ -n "${step_pid:-}" ]; then
        # outside SLURM: torchrun ignores USR1 (see node_main), so signal its workers, as slurmd would
        pkill -USR1 -P "$step_pid" 2>/dev/null || true
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
    srun "${srun_opts[@]}" "${node_cmd[@]}" &
else
    "${node_cmd[@]}" &
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
