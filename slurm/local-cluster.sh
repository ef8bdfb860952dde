#!/usr/bin/env bash
# Single-node SLURM cluster (munge + MariaDB/slurmdbd + slurmctld + slurmd) for CI and for
# trying the cluster path on one box.  Debian 12 (slurm 22.05), run as root, no systemd needed.
#
#   bash slurm/local-cluster.sh up       # install (if missing), configure, start; waits for an idle node
#   bash slurm/local-cluster.sh status   # daemons, sinfo; exit 0 only when the node is up
#   bash slurm/local-cluster.sh down     # stop exactly the daemons this script started (PID files)
#   bash slurm/local-cluster.sh purge    # down, then delete the state dir (DB, job history, logs)
#   bash slurm/local-cluster.sh env      # print the export line
#
# Everything (config, state, MariaDB data, logs, PID files, munge key/socket, dummy GPU
# device files) lives under $STREAMKV_SLURM_STATE (default /tmp/streamkv-slurm).
# Client commands need SLURM_CONF=$STATE/etc/slurm.conf.  So that sbatch/squeue/sacct work in
# any process without it, `up` also links /etc/slurm/slurm.conf -> $STATE/etc/slurm.conf when no
# /etc/slurm/slurm.conf exists (never overwrites one; `down` removes only its own link;
# STREAMKV_SLURM_ETC_LINK=0 disables it).
#
# Knobs (environment): STREAMKV_SLURM_STATE, STREAMKV_SLURM_GPUS (dummy GPUs, default 2),
# STREAMKV_SLURM_PARTITION (default "local"), STREAMKV_SLURM_MAX_ARRAY_SIZE (default 1001, i.e.
# array indices 0..1000), STREAMKV_SLURM_PORT_BASE (default 6817: slurmctld, +1 slurmd,
# +2 slurmdbd, +3 MariaDB on 127.0.0.1), STREAMKV_SLURM_ETC_LINK (default 1).
set -euo pipefail

STATE=${STREAMKV_SLURM_STATE:-/tmp/streamkv-slurm}
NGPUS=${STREAMKV_SLURM_GPUS:-2}
PARTITION=${STREAMKV_SLURM_PARTITION:-local}
MAX_ARRAY_SIZE=${STREAMKV_SLURM_MAX_ARRAY_SIZE:-1001}
PORT_BASE=${STREAMKV_SLURM_PORT_BASE:-6817}
ETC_LINK=${STREAMKV_SLURM_ETC_LINK:-1}
CLUSTER=streamkv
ACCOUNT=streamkv

CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
MYSQL_PORT=$((PORT_BASE + 3))

ETC=$STATE/etc
RUN=$STATE/run
LOG=$STATE/log
VAR=$STATE/var
MYSQL_DATA=$STATE/mysql
MYSQL_SOCK=$RUN/mysqld.sock
# Default munge socket: slurm 22.05 ignores AuthInfo=socket=... on some paths (sacctmgr's
# connection to slurmdbd), so a private socket does not work.  A munged already serving this
# socket (system service) is reused and left alone; otherwise we start one with our own key.
MUNGE_SOCK=/run/munge/munge.socket.2
SLURM_CONF_FILE=$ETC/slurm.conf
export SLURM_CONF=$SLURM_CONF_FILE

# daemon name -> process name (comm) used to check that a PID file still points at our daemon
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { printf '[local-cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pidfile() { echo "$RUN/$1.pid"; }

# PID of our running daemon $1, or nothing.
daemon_pid() {
    local f pid comm
    f=$(pidfile "$1")
    [[ -s $f ]] || return 0
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && alive "$pid" || return 0
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    # comm is at most 15 chars; slurm daemons may run as slurmd-wlm etc. via alternatives
    [[ $comm == "$1"* || $1 == "$comm"* ]] && echo "$pid"
    return 0
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    log "timed out after ${secs} s waiting for $what"
    return 1
}

# ---------------------------------------------------------------------------------------------
install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [[ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/accounting_storage_mysql.so || -n $(ls /usr/lib/*/slurm-wlm/accounting_storage_mysql.so 2>/dev/null) ]] ||
        missing+=(slurm-wlm-mysql-plugin)
    ((${#missing[@]})) || return 0
    [[ $EUID -eq 0 ]] || die "packages missing (${missing[*]}) and not root"
    log "installing ${missing[*]} (apt-get)"
    # Keep package maintainer scripts from starting system-wide munge/mariadb/slurm services:
    # we start our own daemons with our own sockets/ports.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    # Fresh containers have no package lists (Packages or Packages.lz4): update first.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt-get update -q >"$LOG/apt.log" 2>&1 || rc=$?
    fi
    if ((rc == 0)); then
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOG/apt.log" 2>&1 || {
            log "apt-get install failed; running apt-get update and retrying"
            apt-get update -q >>"$LOG/apt.log" 2>&1 &&
                apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOG/apt.log" 2>&1
        } || rc=$?
    fi
    ((own_policy)) && rm -f "$policy"
    ((rc == 0)) || { tail -20 "$LOG/apt.log" >&2; die "apt-get install failed (see $LOG/apt.log)"; }
}

# ---------------------------------------------------------------------------------------------
write_config() {
    local host node cpus_line realmem defmem gres_line i
    host=$(hostname -s)
    # slurmd -C: "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    node=$(slurmd -C | head -1)
    cpus_line=$(sed -E 's/^NodeName=[^ ]+ //; s/ RealMemory=[0-9]+//' <<<"$node")
    realmem=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$node")
    local ncpu
    ncpu=$(sed -nE 's/.*CPUs=([0-9]+).*/\1/p' <<<"$node")
    defmem=$((realmem / ncpu))

    mkdir -p "$STATE/dev"
    gres_line=""
    if ((NGPUS > 0)); then
        # Dummy GPU "devices": symlinks to /dev/null. slurmd only stat()s them (must be a char/block
        # device; plain files are rejected) and exports CUDA_VISIBLE_DEVICES to jobs.  Nothing is
        # created under the real /dev, so CUDA/torch on the box are not confused.
        for ((i = 0; i < NGPUS; i++)); do ln -sfn /dev/null "$STATE/dev/nvidia$i"; done
        gres_line="Gres=gpu:$NGPUS"
        printf 'NodeName=%s Name=gpu File=%s/dev/nvidia[0-%d]\n' "$host" "$STATE" $((NGPUS - 1)) >"$ETC/gres.conf"
    else
        : >"$ETC/gres.conf"
    fi

    cat >"$SLURM_CONF_FILE" <<EOF
# Generated by slurm/local-cluster.sh -- single-node test cluster; regenerated by every cold 'up'.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
# Jobs run as root here (CI containers); this is the default, stated explicitly.
DisableRootJobs=NO
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$VAR/slurmctld
SlurmdSpoolDir=$VAR/slurmd
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups needed (works in unprivileged/non-systemd containers).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# Accounting through slurmdbd: sacct must work (submitit polls it to see finished/crashed jobs).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
GresTypes=gpu
# Largest job array is MaxArraySize-1 indices (0..$((MAX_ARRAY_SIZE - 1))). Sweeps with more
# points: set hydra.sweeper.max_batch_size (see slurm/README.md).
MaxArraySize=$MAX_ARRAY_SIZE
MaxJobCount=10000
MinJobAge=300
KillWait=10
InactiveLimit=0
Waittime=0
SlurmctldTimeout=60
SlurmdTimeout=300
ReturnToService=2
# Trust this config over what slurmd detects (dummy GPUs, containers with odd topology).
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 $cpus_line RealMemory=$realmem $gres_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

    cat >"$ETC/slurmdbd.conf" <<EOF
# Generated by slurm/local-cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
    echo "# no cgroup plugins in use (proctrack/linuxproc, task/none)" >"$ETC/cgroup.conf"
}

# ---------------------------------------------------------------------------------------------
munge_ok() { timeout 5 munge -S "$MUNGE_SOCK" -n -o /dev/null 2>/dev/null; }

start_munge() {
    [[ -n $(daemon_pid munged) ]] && return 0
    if munge_ok; then
        log "reusing the munged already serving $MUNGE_SOCK (not ours; 'down' leaves it)"
        return 0
    fi
    mkdir -p "$STATE/munge" "$(dirname "$MUNGE_SOCK")"
    chmod 700 "$STATE/munge"
    if [[ ! -s $STATE/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$STATE/munge/munge.key" >/dev/null
        else
            dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 400 "$STATE/munge/munge.key"
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    # --force: munged refuses some setups (running as root, state dir under /tmp) without it.
    munged --force --socket="$MUNGE_SOCK" --key-file="$STATE/munge/munge.key" \
        --pid-file="$(pidfile munged)" --log-file="$LOG/munged.log" \
        --seed-file="$STATE/munge/munged.seed" --num-threads=10
    wait_for 10 munge munge_ok || die "munged did not start (see $LOG/munged.log)"
}

# shellcheck disable=SC2120
mysql_cli() { mariadb --no-defaults --socket="$MYSQL_SOCK" -uroot "$@"; }

start_mariadb() {
    [[ -n $(daemon_pid mariadbd) ]] && return 0
    local fresh=0
    if [[ ! -d $MYSQL_DATA/mysql ]]; then
        log "initialising MariaDB data dir"
        rm -rf "$MYSQL_DATA"
        mariadb-install-db --no-defaults --datadir="$MYSQL_DATA" --user=root \
            --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
        fresh=1
        # A new accounting DB does not know the cluster id saved by slurmctld ("CLUSTER ID
        # MISMATCH" is fatal): start the controller state afresh too.
        rm -rf "${VAR:?}/slurmctld" && mkdir -p "$VAR/slurmctld"
    fi
    # setsid: detach from our session so the daemon outlives the calling shell / CI step.
    setsid mariadbd --no-defaults --datadir="$MYSQL_DATA" --user=root \
        --socket="$MYSQL_SOCK" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
        --pid-file="$(pidfile mariadbd)" --log-error="$LOG/mariadb.log" \
        --skip-log-bin --innodb-buffer-pool-size=512M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --max-connections=100 \
        </dev/null >>"$LOG/mariadb.log" 2>&1 &
    wait_for 60 mariadb mysql_cli -e 'SELECT 1' || die "MariaDB did not start (see $LOG/mariadb.log)"
    if ((fresh)); then
        mysql_cli <<'EOF'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
    fi
}

start_slurmdbd() {
    if [[ -z $(daemon_pid slurmdbd) ]]; then
        slurmdbd || die "slurmdbd failed to start (see $LOG/slurmdbd.log)"
    fi
    wait_for 60 slurmdbd timeout 10 sacctmgr -n list cluster || die "slurmdbd not answering (see $LOG/slurmdbd.log)"
    # Register cluster, account and root's association (idempotent).
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if [[ -z $(sacctmgr -n -P list account "$ACCOUNT" format=account) ]]; then
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=streamkv organization=streamkv >/dev/null
    fi
    if [[ -z $(sacctmgr -n -P list assoc cluster="$CLUSTER" account="$ACCOUNT" user=root format=user) ]]; then
        sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    [[ -n $(daemon_pid slurmctld) ]] || slurmctld || die "slurmctld failed (see $LOG/slurmctld.log)"
    wait_for 60 slurmctld timeout 10 scontrol ping || die "slurmctld not answering (see $LOG/slurmctld.log)"
}

start_slurmd() {
    [[ -n $(daemon_pid slurmd) ]] || slurmd || die "slurmd failed (see $LOG/slurmd.log)"
}

node_idle() { timeout 10 sinfo -h -p "$PARTITION" -o '%t' 2>/dev/null | grep -qxE '(idle|mix|alloc)'; }

link_etc() {
    [[ $ETC_LINK == 1 ]] || return 0
    local l=/etc/slurm/slurm.conf
    if [[ -L $l ]]; then
        [[ $(readlink "$l") == "$SLURM_CONF_FILE" ]] && return 0
        [[ -e $l ]] && { log "note: $l links elsewhere; leaving it; export SLURM_CONF"; return 0; }
        ln -sfn "$SLURM_CONF_FILE" "$l"  # dangling link (e.g. left by an old state dir)
    elif [[ -e $l ]]; then
        log "note: $l exists; leaving it alone -- export SLURM_CONF=$SLURM_CONF_FILE for this cluster"
    elif [[ -w /etc ]]; then
        mkdir -p /etc/slurm && ln -s "$SLURM_CONF_FILE" "$l"
    fi
}

unlink_etc() {
    local l=/etc/slurm/slurm.conf
    if [[ -L $l && $(readlink "$l") == "$SLURM_CONF_FILE" ]]; then rm -f "$l"; fi
}

any_running() {
    local d
    for d in "${DAEMONS[@]}"; do [[ -n $(daemon_pid "$d") ]] && return 0; done
    return 1
}

# daemon $1 serving: ours (PID file), or for munge any munged answering on the socket
daemon_ok() { [[ -n $(daemon_pid "$1") ]] || { [[ $1 == munged ]] && munge_ok; }; }

all_running() {
    local d
    for d in "${DAEMONS[@]}"; do daemon_ok "$d" || return 1; done
    return 0
}

cmd_up() {
    [[ $EUID -eq 0 ]] || die "run as root (starts system daemons)"
    local t0=$SECONDS
    mkdir -p "$ETC" "$RUN" "$LOG" "$VAR/slurmctld" "$VAR/slurmd"
    if all_running && node_idle; then
        link_etc
        log "already up ($STATE)"
        print_env
        return 0
    fi
    install_packages
    # Regenerate the config only when nothing of ours runs (a running daemon keeps its config).
    any_running || write_config
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    link_etc
    if ! wait_for 60 node node_idle; then
        sinfo -N -l >&2 || true
        die "node did not become idle (see $LOG/slurmd.log, $LOG/slurmctld.log)"
    fi
    log "up in $((SECONDS - t0)) s: partition '$PARTITION', $(sinfo -h -p "$PARTITION" -o '%c CPUs, %m MB, gres %G')"
    print_env
}

# running and not a zombie (daemons are reparented to PID 1, which may reap them late)
alive() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

stop_pid() {  # stop_pid NAME: SIGTERM, wait, SIGKILL
    local name=$1 pid i
    pid=$(daemon_pid "$name")
    [[ -n $pid ]] || { rm -f "$(pidfile "$name")"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "$name ($pid) ignored SIGTERM for 20 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$(pidfile "$name")"
    log "stopped $name ($pid)"
}

# Job step daemons (slurmstepd) and their jobs started by *our* slurmd: identified by the
# SLURM_CONF of this state dir in their environment (inherited from our slurmd).
our_stepds() {
    local p
    for p in /proc/[0-9]*; do
        [[ $(cat "$p/comm" 2>/dev/null) == slurmstepd ]] || continue
        alive "${p#/proc/}" || continue
        { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF_FILE" && echo "${p#/proc/}"
    done
    return 0
}

cmd_down() {
    if [[ -n $(daemon_pid slurmctld) ]]; then
        # Cancel queued/running jobs so no slurmstepd outlives slurmd.
        if [[ -n $(squeue -h -o %A 2>/dev/null) ]]; then
            log "cancelling jobs still in the queue"
            scancel --quiet --partition="$PARTITION" 2>/dev/null || true
            squeue -h -o %A 2>/dev/null | xargs -r scancel --quiet 2>/dev/null || true
            # shellcheck disable=SC2016
            wait_for 20 jobs bash -c '[[ -z $(squeue -h -o %A -t R,CG,PD 2>/dev/null) ]]' || true
        fi
    fi
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_pid "${DAEMONS[i]}"; done
    local left
    left=$(our_stepds)
    if [[ -n $left ]]; then
        log "killing leftover slurmstepd: $left"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
    fi
    unlink_etc
    log "down"
}

cmd_status() {
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        pid=$(daemon_pid "$d")
        if [[ -z $pid ]] && daemon_ok "$d"; then pid="(not ours: $MUNGE_SOCK)"; fi
        printf '%-10s %s\n' "$d" "${pid:-not running}"
        [[ -n $pid ]] || rc=1
    done
    if ((rc == 0)); then
        sinfo -N -o '%N %P %t %c %m %G' || rc=1
        node_idle || rc=1
    fi
    echo "state dir: $STATE"
    print_env
    return $rc
}

print_env() { echo "export SLURM_CONF=$SLURM_CONF_FILE"; }

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
purge)
    cmd_down
    rm -rf "$STATE"
    log "removed $STATE"
    ;;
env) print_env ;;
*)
    echo "usage: $0 up|down|status|purge|env" >&2
    exit 2
    ;;
esac
