#!/usr/bin/env bash
# One-node SLURM on this machine, for CI and local tests of `sbatch runjob_SLURM.sh`.
#
# Installs Debian's slurmctld/slurmd/slurm-client/munge (skipped when present), writes a minimal
# slurm.conf for this host (CPUs from nproc, RealMemory from /proc/meminfo, 8 fake GPUs as a gres so
# `--gres=gpu:N` / `--gpus-per-node=N` are accepted), starts munged (as user munge), slurmctld and
# slurmd, and waits until `sinfo` shows the node idle. No accounting (sacct does not work; use
# `scontrol show job`). Idempotent: running it again leaves a working cluster alone, and restarts the
# daemons only when the configuration changed. Needs root (or sudo).
#
# Knobs (environment): SLURM_FAKE_GPUS (8), SLURM_SETUP_TIMEOUT seconds to wait for the node (90),
# SLURM_PARTITION (debug).
set -euo pipefail

t_start=$(date +%s)
log() { echo "[setup_slurm] $*"; }
die() { echo "[setup_slurm] ERROR: $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then exec sudo -E bash "$0" "$@"; fi
    die "must run as root (or with sudo available)"
fi

FAKE_GPUS=${SLURM_FAKE_GPUS:-8}
TIMEOUT=${SLURM_SETUP_TIMEOUT:-90}
PARTITION=${SLURM_PARTITION:-debug}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
HOST=$(hostname -s)

# ---------------------------------------------------------------- install
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends keeps it small; the daemons' postinst may fail to start them (no systemd): fine
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
for b in slurmctld slurmd sbatch sinfo scontrol munged; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found after install"
done

# ---------------------------------------------------------------- munge
id munge >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    log "starting munged"
    rm -f /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# ---------------------------------------------------------------- config
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
# sockets/cores/threads as slurmd sees them (else it drains the node for a topology mismatch)
TOPO=$(slurmd -C 2>/dev/null | head -n1 | grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' || true)
[ -n "$TOPO" ] || TOPO="CPUs=${CPUS}"
# fake GPUs: gres/gpu needs one device file per GPU; symlinks to /dev/null are character devices
FAKE_DIR=/var/lib/slurm-fake-gpu
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd "$FAKE_DIR"
for i in $(seq 0 $((FAKE_GPUS - 1))); do ln -sfn /dev/null "$FAKE_DIR/gpu$i"; done
new_conf=$(cat <<EOF
# Written by .ci/setup_slurm.sh: a one-node test cluster (not for production).
ClusterName=localci
SlurmctldHost=${HOST}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=${HOST} NodeAddr=127.0.0.1 ${TOPO} RealMemory=${MEM_MB} Gres=gpu:${FAKE_GPUS} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
new_gres="NodeName=${HOST} Name=gpu File=${FAKE_DIR}/gpu[0-$((FAKE_GPUS - 1))]"
changed=0
if [ "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" != "$new_conf" ]; then
    printf '%s\n' "$new_conf" >"$CONF_DIR/slurm.conf"; changed=1
fi
if [ "$(cat "$CONF_DIR/gres.conf" 2>/dev/null)" != "$new_gres" ]; then
    printf '%s\n' "$new_gres" >"$CONF_DIR/gres.conf"; changed=1
fi

# ---------------------------------------------------------------- daemons
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ $changed -eq 1 ]; then
    log "configuration written to $CONF_DIR ($TOPO RealMemory=$MEM_MB gpu=$FAKE_GPUS)"
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if alive $pidfile; then
            log "stopping $(basename $pidfile .pid) to apply the new configuration"
            pid=$(cat $pidfile); kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
if alive /run/slurmctld.pid; then
    log "slurmctld already running"
else
    log "starting slurmctld"
    slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || { tail -20 "$LOG_DIR/slurmctld.log" >&2 || true; die "slurmctld is not answering"; }
if alive /run/slurmd.pid; then
    log "slurmd already running"
else
    log "starting slurmd"
    slurmd || { tail -20 "$LOG_DIR/slurmd.log" >&2 || true; die "slurmd failed to start; see $LOG_DIR/slurmd.log"; }
fi

# ---------------------------------------------------------------- wait for the node
deadline=$(( $(date +%s) + TIMEOUT ))
state=""
while :; do
    state=$(sinfo -h -n "$HOST" -o '%t' 2>/dev/null | head -n1 || true)
    case "$state" in
        idle|mix|alloc) break ;;
        down*|drain*|drng*|fail*|inval*)
            scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        sinfo -N -l >&2 || true
        tail -20 "$LOG_DIR/slurmd.log" >&2 || true
        die "node $HOST not idle after ${TIMEOUT}s (state: ${state:-unknown})"
    fi
    sleep 0.5
done
log "node $HOST is $state; SLURM ready in $(( $(date +%s) - t_start ))s"
sinfo
