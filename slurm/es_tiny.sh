#!/bin/bash
# Try hpc_es on Slurm in minutes: the built-in tiny model learns the conciseness task on CPUs with
# 2 MPI ranks (configs/tiny_mpi.yaml).  No GPU and no download needed.
#
#   sbatch slurm/es_tiny.sh                         # from the repository root
#   HPC_ES_PYTHON=$PWD/.venv/bin/python sbatch slurm/es_tiny.sh es.iterations=5   # key=value overrides
#
# Settings (environment, exported to the job by sbatch):
#   HPC_ES_PYTHON   python with hpc_es installed (default: python)
#   HPC_ES_CONFIG   config (default: configs/tiny_mpi.yaml)
#   HPC_ES_MODEL    model folder, or "tiny" for the built-in model (default: tiny)
#   HPC_ES_RUN_DIR  run folder (default: runs/tiny_mpi-$SLURM_JOB_ID under the submit folder)
#   HPC_ES_MPI      srun --mpi plugin: pmix (Open MPI, default) or pmi2 (MPICH)
# Output: hpc_es-tiny-JOBID.out in the submit folder; the final model in $HPC_ES_RUN_DIR/final.
# Preemption, a time limit (USR2 180 s before it) or scancel --signal=USR2: the ranks checkpoint and the job
# requeues itself, then resumes from the run folder.
#SBATCH --job-name=hpc_es-tiny
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --mem-per-cpu=2G
#SBATCH --time=00:30:00
#SBATCH --signal=USR2@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=hpc_es-tiny-%j.out

# sbatch runs a copy of this script: find the repository (for common.sh and configs/) from the path
# Slurm recorded at submission, HPC_ES_HOME, or the submit folder.
for d in "${HPC_ES_HOME:-}" "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null |
         sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-$PWD}"; do
    [[ -n $d && -f $d/slurm/common.sh ]] && { HPC_ES_HOME=$(cd "$d" && pwd); break; }
done
[[ -f ${HPC_ES_HOME:-}/slurm/common.sh ]] || { echo "hpc_es: error: cannot find the hpc_es repository; set HPC_ES_HOME" >&2; exit 2; }
source "$HPC_ES_HOME/slurm/common.sh"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
: "${HPC_ES_CONFIG:=$HPC_ES_HOME/configs/tiny_mpi.yaml}"
: "${HPC_ES_MODEL:=tiny}"
: "${HPC_ES_RUN_DIR:=${SLURM_SUBMIT_DIR:-$PWD}/runs/tiny_mpi-${SLURM_JOB_ID:-local}}"

hpc_es_preflight "$@"
hpc_es_launch
