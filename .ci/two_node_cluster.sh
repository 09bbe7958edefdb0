#!/usr/bin/env bash
# A two-host SLURM cluster on this one machine, for tests of `sbatch --nodes=2 runjob_SLURM.sh`.
#
#     bash .ci/two_node_cluster.sh up      # build it (tears down a stale one first); prints how to use it
#     bash .ci/two_node_cluster.sh down    # remove everything `up` made (safe to run twice, or after a crash)
#     bash .ci/two_node_cluster.sh env     # print the variables a client needs (SLURM_CONF=...)
#
# What `up` builds:
#   - two network namespaces, $NS_A and $NS_B, joined by one veth pair; each end gets one address of a
#     private /24 ($SUBNET.1 = $HOST_A, $SUBNET.2 = $HOST_B) and the namespaces have no other route, so
#     nothing started in them can send a packet anywhere but to each other or to their own loopback;
#   - /etc/netns/<ns>/hosts naming both hosts (`ip netns exec` bind-mounts it over /etc/hosts), and
#     /etc/netns/<ns>/resolv.conf pointing at the namespace's own loopback (no DNS query leaves it), and
#     every daemon in its own UTS namespace (`unshare --uts`) with the host's name as hostname: torchrun's
#     c10d rendezvous and slurmctld's "am I the controller" check both go by the hostname;
#   - slurmctld on $HOST_A, listening on $SUBNET.1:$CTLD_PORT; one slurmd per host (`-N <node>`,
#     port $SLURMD_PORT). Clients (sbatch, scontrol, scancel, sinfo) must run inside $NS_A with
#     SLURM_CONF set: `ip netns exec $NS_A env SLURM_CONF=$DIR/slurm.conf sbatch ...`; jobs inherit it;
#   - munge: the machine's munged (the one .ci/setup_slurm.sh starts; started here if none answers). Its
#     socket is a unix socket on the file system, so the namespaces share it.
# The one-node cluster of .ci/setup_slurm.sh (/etc/slurm, ports 6817/6818) is left running and untouched:
# this one has its own config dir, state, spool, pid and log files under $DIR and its own ports.
#
# Knobs (environment): TWO_NODE_DIR ($DIR, /tmp/mmdit-slurm2; `down` removes it unless TWO_NODE_KEEP_LOGS=1), TWO_NODE_SUBNET (10.213.7, a /24 that must
# not be used on this machine), TWO_NODE_TIMEOUT seconds to wait for both nodes (60), TWO_NODE_FAKE_GPUS (2).
# Needs root, iproute2 (`ip netns`), util-linux (`unshare`) and SLURM installed (.ci/setup_slurm.sh).
# Exit code 3 means "cannot run here" (not root, no `ip netns`, no SLURM): the pytest fixture skips then.
set -euo pipefail

DIR=${TWO_NODE_DIR:-/tmp/mmdit-slurm2}
SUBNET=${TWO_NODE_SUBNET:-10.213.7}
TIMEOUT=${TWO_NODE_TIMEOUT:-60}
FAKE_GPUS=${TWO_NODE_FAKE_GPUS:-2}
NS_A=mmdit-na NS_B=mmdit-nb
HOST_A=mmdit-a HOST_B=mmdit-b
VETH_A=mmdit-va VETH_B=mmdit-vb
CTLD_PORT=6917 SLURMD_PORT=6918
CONF=$DIR/slurm.conf

log() { echo "[two_node] $*"; }
die() { echo "[two_node] ERROR: $*" >&2; exit 1; }
cannot() { echo "[two_node] CANNOT RUN HERE: $*" >&2; exit 3; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" env SLURM_CONF="$CONF" "$@"; }

preflight() {
    [ "$(id -u)" -eq 0 ] || cannot "must run as root (network namespaces, slurmd)"
    if ! command -v ip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        log "installing iproute2"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 >/dev/null 2>&1 || true
    fi
    command -v ip >/dev/null 2>&1 && ip netns list >/dev/null 2>&1 || cannot "no usable 'ip netns' (install iproute2)"
    command -v unshare >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1 || cannot "no unshare/nsenter (install util-linux)"
    for b in slurmctld slurmd sbatch sinfo scontrol munge unmunge; do
        command -v "$b" >/dev/null 2>&1 || cannot "$b not found: run .ci/setup_slurm.sh first (it installs SLURM and munge)"
    done
    if ip -o -4 addr show | grep -q " ${SUBNET//./\\.}\.[0-9]*/"; then
        ip netns list | grep -q "^$NS_A" || die "$SUBNET.0/24 is already used on this machine; set TWO_NODE_SUBNET to a free /24"
    fi
}

# shellcheck disable=SC2317
down() {
    for pidfile in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    # whatever is still running inside our namespaces was started there by this cluster (job steps)
    for ns in $NS_A $NS_B; do
        if ip netns list 2>/dev/null | grep -q "^$ns\b"; then
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            # shellcheck disable=SC2086
            [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
            ip netns del "$ns" 2>/dev/null || true
        fi
        rm -rf "/etc/netns/$ns"
    done
    rmdir /etc/netns 2>/dev/null || true  # only if empty: other namespaces' entries stay
    ip link del "$VETH_A" 2>/dev/null || true  # gone with its namespace; only left if `up` died half-way
    if [ "${TWO_NODE_KEEP_LOGS:-0}" != 1 ]; then rm -rf "$DIR"; fi
}

ensure_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    [ -s /etc/munge/munge.key ] || die "munged is not running and /etc/munge/munge.key is missing: run .ci/setup_slurm.sh"
    log "starting munged"
    mkdir -p /run/munge && chown munge:munge /run/munge
    rm -f /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

network() {
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip link add "$VETH_A" type veth peer name "$VETH_B"
    ip link set "$VETH_A" netns "$NS_A"
    ip link set "$VETH_B" netns "$NS_B"
    ip -n "$NS_A" addr add "$SUBNET.1/24" dev "$VETH_A"
    ip -n "$NS_B" addr add "$SUBNET.2/24" dev "$VETH_B"
    for ns in $NS_A $NS_B; do
        ip -n "$ns" link set lo up
        mkdir -p "/etc/netns/$ns"
        # the ::ffff: forms: c10d's store listens on IPv6 and looks up its peers' v4-mapped addresses
        {
            printf '127.0.0.1 localhost\n::1 localhost\n::ffff:127.0.0.1 localhost\n'
            printf '%s.1 %s\n%s.2 %s\n' "$SUBNET" "$HOST_A" "$SUBNET" "$HOST_B"
            printf '::ffff:%s.1 %s\n::ffff:%s.2 %s\n' "$SUBNET" "$HOST_A" "$SUBNET" "$HOST_B"
        } >"/etc/netns/$ns/hosts"
        # name look-ups that miss the hosts file (c10d asks for the names of its peers' addresses) go to
        # the namespace's own loopback, where nothing answers: never to the machine's DNS server
        printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"/etc/netns/$ns/resolv.conf"
    done
    ip -n "$NS_A" link set "$VETH_A" up
    ip -n "$NS_B" link set "$VETH_B" up
}

config() {
    mkdir -p "$DIR/state" "$DIR/spool/$HOST_A" "$DIR/spool/$HOST_B" "$DIR/fake-gpu"
    for i in $(seq 0 $((FAKE_GPUS - 1))); do ln -sfn /dev/null "$DIR/fake-gpu/gpu$i"; done
    local topo
    topo=$(slurmd -C 2>/dev/null | head -n1 | grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' || true)
    [ -n "$topo" ] || topo="CPUs=$(nproc)"
    # both "hosts" are this machine: each claims all its CPUs (the jobs here are tiny)
    cat >"$CONF" <<EOF
# Written by .ci/two_node_cluster.sh: a two-host test cluster in network namespaces (not for production).
ClusterName=mmdit2
SlurmctldHost=${HOST_A}(${SUBNET}.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd-%n.pid
SlurmctldLogFile=${DIR}/slurmctld.log
SlurmdLogFile=${DIR}/slurmd-%n.log
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
KillWait=30
MinJobAge=300
NodeName=${HOST_A} NodeAddr=${SUBNET}.1 ${topo} RealMemory=2000 Gres=gpu:${FAKE_GPUS} State=UNKNOWN
NodeName=${HOST_B} NodeAddr=${SUBNET}.2 ${topo} RealMemory=2000 Gres=gpu:${FAKE_GPUS} State=UNKNOWN
PartitionName=two Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    printf 'Name=gpu File=%s/fake-gpu/gpu[0-%d]\n' "$DIR" $((FAKE_GPUS - 1)) >"$DIR/gres.conf"
}

# start_on <ns> <hostname> <command...>: run a daemon in network namespace <ns>, in its own UTS namespace
# (hostname <hostname>) and mount namespace (the ns's hosts file bind-mounted over /etc/hosts). Not
# `ip netns exec`: it mounts a fresh /sys without /sys/fs/cgroup, and slurmd will not start without it.
start_on() {
    local ns=$1 host=$2; shift 2
    # shellcheck disable=SC2016
    SLURM_CONF="$CONF" nsenter --net="/run/netns/$ns" unshare --uts --mount -- \
        sh -c 'mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/resolv.conf" /etc/resolv.conf &&
               hostname "$2" && shift 2 && exec "$@"' \
        _ "/etc/netns/$ns" "$host" "$@"
}

up() {
    preflight
    down
    rm -rf "$DIR"  # a fresh cluster: no job ids, state or logs of an earlier one
    mkdir -p "$DIR"
    ensure_munge
    network
    config
    log "slurmctld on $HOST_A ($SUBNET.1:$CTLD_PORT)"
    start_on "$NS_A" "$HOST_A" slurmctld -f "$CONF" -c || { tail -20 "$DIR/slurmctld.log" >&2 || true; die "slurmctld failed"; }
    for _ in $(seq 100); do in_ns "$NS_A" scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
    in_ns "$NS_A" scontrol ping | grep -q UP || { tail -20 "$DIR/slurmctld.log" >&2 || true; die "slurmctld is not answering"; }
    start_on "$NS_A" "$HOST_A" slurmd -f "$CONF" -N "$HOST_A" || die "slurmd on $HOST_A failed; see $DIR/slurmd-$HOST_A.log"
    start_on "$NS_B" "$HOST_B" slurmd -f "$CONF" -N "$HOST_B" || die "slurmd on $HOST_B failed; see $DIR/slurmd-$HOST_B.log"
    local deadline=$(( $(date +%s) + TIMEOUT )) states=""
    while :; do
        states=$(in_ns "$NS_A" sinfo -h -N -o '%N=%t' 2>/dev/null | sort | tr '\n' ' ' || true)
        if [ "$states" = "$HOST_A=idle $HOST_B=idle " ]; then break; fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            tail -5 "$DIR"/slurmd-*.log "$DIR/slurmctld.log" >&2 || true
            die "nodes not idle after ${TIMEOUT}s: ${states:-no answer}"
        fi
        sleep 0.5
    done
    log "ready: $states"
    log "use: ip netns exec $NS_A env SLURM_CONF=$CONF sbatch --nodes=2 ..."
}

case "${1:-}" in
    up) up ;;
    down) [ "$(id -u)" -eq 0 ] || cannot "must run as root"; down; log "removed" ;;
    env) echo "SLURM_CONF=$CONF NETNS=$NS_A HOSTS=$HOST_A,$HOST_B" ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
