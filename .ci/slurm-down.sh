#!/usr/bin/env bash
# Stop the daemons that .ci/slurm-up.sh started in DIR (by their pid files).
#
#   .ci/slurm-down.sh DIR
#
# Never fails when things are already down or DIR does not exist.  Order:
# slurmd, slurmctld, slurmdbd, mariadbd, munged (reverse of start-up).  Each
# gets SIGTERM, then up to SLURM_DOWN_WAIT seconds (default 20) to exit,
# then SIGKILL.
set -uo pipefail

if [[ $# -ne 1 || -z "$1" ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
if [[ ! -d $1 ]]; then
    echo "[slurm-down] $1 does not exist; nothing to stop"
    exit 0
fi
DIR=$(cd "$1" && pwd -P)
RUN=$DIR/run
WAIT=${SLURM_DOWN_WAIT:-20}
t_start=$(date +%s.%N)

read_pid() {
    local f=$RUN/$1.pid
    [[ -s $f ]] || return 1
    tr -dc '0-9' <"$f"
}

# Cancel the jobs still in the queue so that no job step outlives slurmd.
ctld_pid=$(read_pid slurmctld 2>/dev/null || true)
if [[ -f $DIR/etc/slurm.conf && -n $ctld_pid ]] && kill -0 "$ctld_pid" 2>/dev/null; then
    export SLURM_CONF=$DIR/etc/slurm.conf
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs >/dev/null 2>&1 || true
        for _ in $(seq 100); do
            [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
fi

# Send SIGTERM to every daemon first (so they shut down in parallel), then wait.
declare -A pids=()
for d in slurmd slurmctld slurmdbd mariadbd munged; do
    pid=$(read_pid "$d") || continue
    [[ -n $pid ]] || continue
    if kill -0 "$pid" 2>/dev/null; then
        # Guard against a stale pid file whose number was reused by another program.
        comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
        case "$comm" in
            "$d" | mysqld | mariadbd | munged | slurm*) ;;
            *) echo "[slurm-down] $d: pid $pid is '$comm', not ours; skipping"; continue ;;
        esac
        kill -TERM "$pid" 2>/dev/null && pids[$d]=$pid
    fi
done

deadline=$(( $(date +%s) + WAIT ))
for d in slurmd slurmctld slurmdbd mariadbd munged; do
    pid=${pids[$d]:-}
    [[ -n $pid ]] || continue
    while kill -0 "$pid" 2>/dev/null && [[ $(date +%s) -lt $deadline ]]; do
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "[slurm-down] $d (pid $pid) still running after ${WAIT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    echo "[slurm-down] $d (pid $pid) stopped"
done

# Job steps that outlived slurmd (slurmstepd and its job processes): stop the
# ones that belong to this cluster (slurmstepd inherits SLURM_CONF from slurmd).
kill_tree() {
    local p=$1 c
    # children by the PPid: line of /proc/*/status (no procps needed)
    while read -r c; do
        [[ -n $c ]] && kill_tree "$c"
    done < <(awk -v pp="$p" '/^Pid:/ { pid = $2 } /^PPid:/ && $2 == pp { print pid }' /proc/[0-9]*/status 2>/dev/null)
    kill -KILL "$p" 2>/dev/null || true
}
for p in /proc/[0-9]*; do
    [[ $(cat "$p/comm" 2>/dev/null) == slurmstepd ]] || continue
    if tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qxF "SLURM_CONF=$DIR/etc/slurm.conf"; then
        kill_tree "${p#/proc/}"
    fi
done

rm -f "$RUN"/*.pid "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock" "$DIR/mysqld.sock"
awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "[slurm-down] done in %.1fs\n", b - a }'
exit 0
