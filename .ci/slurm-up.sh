#!/usr/bin/env bash
# Bring up a throw-away single-node Slurm cluster (with accounting) in DIR.
#
#   .ci/slurm-up.sh DIR        # DIR is created if missing
#   source DIR/env.sh          # then sbatch/squeue/sacct talk to this cluster
#   .ci/slurm-down.sh DIR      # stop everything again
#
# Daemons started here (each with its pid file in DIR/run): munged, mariadbd,
# slurmdbd, slurmctld, slurmd.  Nothing is written outside DIR except the apt
# packages installed when missing (with a temporary /usr/sbin/policy-rc.d so
# that apt starts no system-wide daemons).  Ports: the first free ones from
# 3306 (mariadb) and 6817.. (slurmctld, slurmd, slurmdbd), so that several
# clusters can run side by side.  Safe to run again: if the cluster in DIR is
# already up, it only checks it and returns; after slurm-down it restarts
# with the same database and munge key.
#
# Knobs (environment):
#   SLURM_UP_TIMEOUT   seconds to wait for the node to become idle (default 60)
#   SLURM_UP_KEEP_ON_FAIL=1   leave daemons running when bring-up fails
#   SLURM_UP_NO_INSTALL=1     never call apt-get; fail if binaries are missing
#   SLURM_UP_CPUS             CPUs of the node (default: nproc without OMP_* limits)
#   SLURM_UP_CRED_EXPIRE      AuthInfo cred_expire in seconds (default 10); a
#                             requeued job waits this long (+1 s) before restarting
set -euo pipefail

if [[ $# -ne 1 || -z "$1" ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi

t_start=$(date +%s.%N)
elapsed() { awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[slurm-up $(elapsed)s] $*"; }
die() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
DIR=$(cd "$1" && pwd -P)
TIMEOUT=${SLURM_UP_TIMEOUT:-60}

if [[ $(id -u) -ne 0 ]]; then
    die "must run as root (SlurmUser=root, and apt-get may be needed)"
fi

# --------------------------------------------------------------------------
# 1. packages
# --------------------------------------------------------------------------
# libpmix-dev: Debian's mpi/pmix plugin dlopen()s the unversioned
# .../pmix2/lib/libpmix.so, which only the -dev package ships; without it
# `srun --mpi=pmix` fails with "can not load PMIx library".
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server libpmix-dev)
export PATH="$PATH:/usr/sbin:/sbin"
have_libpmix() { compgen -G "/usr/lib/*/pmix2/lib/libpmix.so" >/dev/null || compgen -G "/usr/lib*/libpmix.so" >/dev/null; }
missing=()
for bin in slurmctld slurmd slurmdbd sbatch sinfo sacctmgr munged munge mariadb-install-db mariadb; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
have_libpmix || missing+=(libpmix.so)
need_install=0
if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ ${SLURM_UP_NO_INSTALL:-0} == 1 ]]; then
        if [[ ${missing[*]} != libpmix.so ]]; then
            die "missing: ${missing[*]} (and SLURM_UP_NO_INSTALL=1); install ${PKGS[*]}"
        fi
        # only libpmix.so is missing: carry on without pmix (warned below)
    else
        need_install=1
    fi
fi
if [[ $need_install -eq 1 ]]; then
    command -v apt-get >/dev/null || die "binaries missing and no apt-get to install ${PKGS[*]}"
    log "installing ${PKGS[*]} ..."
    export DEBIAN_FRONTEND=noninteractive
    # Keep packaged init scripts from starting system-wide daemons on machines
    # that have an init system; we start our own copies below.
    policy_rc=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e $policy_rc ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy_rc"
        chmod 755 "$policy_rc"
        made_policy=1
    fi
    rc=0
    { apt-get update -q -o DPkg::Lock::Timeout=300 && apt-get install -y -q -o DPkg::Lock::Timeout=300 "${PKGS[@]}"; } >"$DIR/apt.log" 2>&1 || rc=$?
    [[ $made_policy -eq 1 ]] && rm -f "$policy_rc"
    if [[ $rc -ne 0 ]]; then
        tail -n 40 "$DIR/apt.log" >&2
        die "apt-get install failed (full log: $DIR/apt.log)"
    fi
    log "packages installed"
fi

MARIADBD=$(command -v mariadbd || command -v mysqld || true)
[[ -n $MARIADBD ]] || die "mariadbd not found"

# Slurm plugin directory (for the pmix check)
PLUGIN_DIR=""
for d in /usr/lib/*/slurm-wlm /usr/lib/slurm-wlm /usr/lib64/slurm /usr/lib/slurm; do
    if [[ -e $d/select_cons_tres.so ]]; then PLUGIN_DIR=$d; break; fi
done
MPI_DEFAULT=pmix
if [[ -z $PLUGIN_DIR ]] || ! compgen -G "$PLUGIN_DIR/mpi_pmix*.so" >/dev/null; then
    log "WARNING: Slurm mpi/pmix plugin not found (plugin dir '${PLUGIN_DIR:-?}'); using MpiDefault=none"
    MPI_DEFAULT=none
elif ! have_libpmix; then
    log "WARNING: libpmix.so not found (install libpmix-dev); using MpiDefault=none"
    MPI_DEFAULT=none
fi

# --------------------------------------------------------------------------
# 2. layout and helpers
# --------------------------------------------------------------------------
RUN=$DIR/run          # pid files
LOGS=$DIR/log
ETC=$DIR/etc          # slurm.conf, slurmdbd.conf (same folder: slurmdbd looks next to SLURM_CONF)
MUNGE_DIR=$DIR/munge
DB_DIR=$DIR/mysql
DB_SOCK=$DIR/mysqld.sock
SLURM_CONF_PATH=$ETC/slurm.conf
mkdir -p "$RUN" "$LOGS" "$ETC" "$MUNGE_DIR" "$DIR/spool/ctld" "$DIR/spool/d"
chmod 755 "$DIR" "$MUNGE_DIR"

for sock in "$MUNGE_DIR/munge.socket" "$DB_SOCK"; do
    if [[ ${#sock} -gt 100 ]]; then
        die "socket path too long for a unix socket (${#sock} chars): $sock; use a shorter DIR"
    fi
done

pid_alive() {  # pid_alive NAME -> 0 when DIR/run/NAME.pid names a live process
    local f=$RUN/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

port_busy() {  # port_busy PORT -> 0 when something listens on TCP PORT
    # Read the kernel's socket table rather than connecting: a probe
    # connection would make another cluster's daemons log errors.
    if [[ -r /proc/net/tcp ]]; then
        awk -v h="$(printf '%04X' "$1")" \
            'FNR > 1 && $4 == "0A" { n = split($2, a, ":"); if (a[n] == h) found = 1 }
             END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

free_port() {  # free_port PREFERRED -> prints PREFERRED or the next free one
    local p=$1
    while port_busy "$p"; do p=$((p + 1)); done
    echo "$p"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD... -> polls CMD every 0.1 s
    local limit=$1 what=$2 i=0
    shift 2
    while ! "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        if [[ $i -gt $((limit * 10)) ]]; then
            fail "timed out after ${limit}s waiting for $what"
        fi
        sleep 0.1
    done
}

dump_logs() {
    local f
    if [[ -f $SLURM_CONF_PATH ]] && pid_alive slurmctld; then
        echo "----- node state (sinfo / scontrol show node) -----" >&2
        SLURM_CONF=$SLURM_CONF_PATH timeout 10 sinfo -N -o '%N %T %E' >&2 || true
        SLURM_CONF=$SLURM_CONF_PATH timeout 10 scontrol show node >&2 || true
    fi
    for f in "$LOGS"/*.log "$DIR/apt.log"; do
        [[ -s $f ]] || continue
        echo "----- $f (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2
    done
}

fail() {
    echo "[slurm-up] ERROR: $*" >&2
    dump_logs
    if [[ ${SLURM_UP_KEEP_ON_FAIL:-0} != 1 ]]; then
        echo "[slurm-up] stopping the daemons started in $DIR (SLURM_UP_KEEP_ON_FAIL=1 keeps them)" >&2
        "$HERE/slurm-down.sh" "$DIR" >&2 || true
    fi
    exit 1
}

node_idle() {
    local states
    states=$(SLURM_CONF=$SLURM_CONF_PATH sinfo -h -o %T 2>/dev/null) || return 1
    [[ $states == idle ]]
}

# --------------------------------------------------------------------------
# 3. already up?  Then only check it.
# --------------------------------------------------------------------------
all_up=1
for d in munged mariadbd slurmdbd slurmctld slurmd; do pid_alive "$d" || all_up=0; done
if [[ $all_up -eq 1 && -f $DIR/env.sh && -f $SLURM_CONF_PATH ]]; then
    log "daemons in $DIR already running; checking the node"
    wait_for "$TIMEOUT" "node 'localhost' to be idle (sinfo -h -o %T)" node_idle
    log "cluster already up (took $(elapsed)s); source $DIR/env.sh"
    exit 0
fi
# A partial leftover (some daemons dead): stop the rest and start over.
"$HERE/slurm-down.sh" "$DIR" >/dev/null 2>&1 || true
for f in "$LOGS"/*.log; do
    [[ -e $f ]] && mv -f "$f" "$f.prev"
done

# --------------------------------------------------------------------------
# 4. configuration
# --------------------------------------------------------------------------
# GNU nproc honours OMP_NUM_THREADS / OMP_THREAD_LIMIT (test setups often set
# OMP_NUM_THREADS=1); count the CPUs we may run on without them.
NCPU=${SLURM_UP_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
MEM_MB=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
REAL_MEM=$((MEM_MB - 1024))
[[ $REAL_MEM -ge 256 ]] || REAL_MEM=$((MEM_MB / 2))

DB_PORT=$(free_port 3306)
DBD_PORT=$(free_port 6819)
CTLD_PORT=$(free_port 6817)
SLURMD_PORT=$(free_port 6818)
[[ $SLURMD_PORT -eq $CTLD_PORT ]] && SLURMD_PORT=$(free_port $((CTLD_PORT + 1)))
[[ $DBD_PORT -eq $CTLD_PORT || $DBD_PORT -eq $SLURMD_PORT ]] && DBD_PORT=$(free_port $((SLURMD_PORT + 1)))
CLUSTER=hpces
CRED_EXPIRE=${SLURM_UP_CRED_EXPIRE:-10}
DB_USER=slurm
DB_PASS=slurmpw

cat >"$SLURM_CONF_PATH" <<EOF
# generated by .ci/slurm-up.sh
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start
# again (default 120 s); keep it short for tests.
AuthInfo=socket=$MUNGE_DIR/munge.socket,cred_expire=$CRED_EXPIRE
CredType=cred/munge
MpiDefault=$MPI_DEFAULT
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job without --mem takes all the node's memory and jobs
# never share the node.
DefMemPerCPU=$((REAL_MEM / NCPU))
SchedulerType=sched/backfill
# Run the scheduler often (defaults: 60 s / 30 s) so that requeued and
# newly eligible jobs start within seconds.
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
MailProg=/bin/true
StateSaveLocation=$DIR/spool/ctld
TmpFS=$DIR/tmp
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_DIR/munge.socket
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

# The pmix plugin makes a per-step folder spmix_appdir_<uid>_<job>.<step>
# under TmpFS (/tmp) by default: a leftover from an earlier cluster (job ids
# restart at 1) makes every later step with that id fail ("File exists").
# Keep it inside DIR.
mkdir -p "$DIR/tmp/pmix"
cat >"$ETC/mpi.conf" <<EOF
PMIxCliTmpDirBase=$DIR/tmp/pmix
EOF
chmod 644 "$ETC/mpi.conf"

cat >"$ETC/slurmdbd.conf" <<EOF
# generated by .ci/slurm-up.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$ETC/slurmdbd.conf"
chmod 644 "$SLURM_CONF_PATH"

export SLURM_CONF=$SLURM_CONF_PATH

# --------------------------------------------------------------------------
# 5. munged
# --------------------------------------------------------------------------
if [[ ! -s $MUNGE_DIR/munge.key ]]; then
    head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key"
fi
chmod 400 "$MUNGE_DIR/munge.key"
rm -f "$MUNGE_DIR/munge.socket" "$MUNGE_DIR/munge.socket.lock"
munged --force \
    --key-file="$MUNGE_DIR/munge.key" \
    --socket="$MUNGE_DIR/munge.socket" \
    --pid-file="$RUN/munged.pid" \
    --log-file="$LOGS/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" \
    || fail "munged did not start"
wait_for 10 "munged socket" test -S "$MUNGE_DIR/munge.socket"
wait_for 10 "munge round trip" bash -c "munge -S '$MUNGE_DIR/munge.socket' -n | unmunge -S '$MUNGE_DIR/munge.socket'"
log "munged up"

# --------------------------------------------------------------------------
# 6. mariadb + slurm db user
# --------------------------------------------------------------------------
if [[ ! -d $DB_DIR/mysql ]]; then
    rm -rf "$DB_DIR"
    mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR" \
        --auth-root-authentication-method=socket --skip-test-db \
        >"$LOGS/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed"
fi
rm -f "$DB_SOCK"
"$MARIADBD" --no-defaults --user=root --datadir="$DB_DIR" \
    --socket="$DB_SOCK" --pid-file="$RUN/mariadbd.pid" \
    --bind-address=127.0.0.1 --port="$DB_PORT" \
    --log-error="$LOGS/mariadbd.log" --skip-log-bin \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
    </dev/null >/dev/null 2>&1 &
disown
wait_for 30 "mariadbd on $DB_SOCK" mariadb --no-defaults --socket="$DB_SOCK" -uroot -e 'SELECT 1'
mariadb --no-defaults --socket="$DB_SOCK" -uroot <<EOF || fail "could not create the slurm db user"
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
log "mariadbd up on 127.0.0.1:$DB_PORT"

# --------------------------------------------------------------------------
# 7. slurmdbd, cluster registration
# --------------------------------------------------------------------------
slurmdbd || fail "slurmdbd did not start"
wait_for 30 "slurmdbd pid file" pid_alive slurmdbd
wait_for 30 "slurmdbd to answer (sacctmgr show cluster)" sacctmgr -n -P show cluster
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr add cluster $CLUSTER failed"
fi
log "slurmdbd up on port $DBD_PORT, cluster '$CLUSTER' registered"

# --------------------------------------------------------------------------
# 8. slurmctld + slurmd
# --------------------------------------------------------------------------
slurmctld -f "$SLURM_CONF_PATH" || fail "slurmctld did not start"
wait_for 30 "slurmctld pid file" pid_alive slurmctld
slurmd -f "$SLURM_CONF_PATH" -N localhost || fail "slurmd did not start"
wait_for 30 "slurmd pid file" pid_alive slurmd
wait_for "$TIMEOUT" "node 'localhost' to be idle (sinfo -h -o %T)" node_idle
log "slurmctld (port $CTLD_PORT) and slurmd (port $SLURMD_PORT) up, node idle"

# --------------------------------------------------------------------------
# 9. client environment
# --------------------------------------------------------------------------
cat >"$DIR/env.sh" <<EOF
# generated by .ci/slurm-up.sh: source this to talk to the cluster in $DIR
export SLURM_CONF=$SLURM_CONF_PATH
export HPC_ES_SLURM_DIR=$DIR
export HPC_ES_SLURM_MPI=$MPI_DEFAULT
case ":\$PATH:" in *:/usr/sbin:*) ;; *) export PATH="\$PATH:/usr/sbin" ;; esac
EOF

if [[ $MPI_DEFAULT == pmix ]] && ! srun --mpi=list 2>&1 | grep -q pmix; then
    log "WARNING: 'srun --mpi=list' does not list pmix"
fi

log "cluster up in $DIR (took $(elapsed)s); run: source $DIR/env.sh"
