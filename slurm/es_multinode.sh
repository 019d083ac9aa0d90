#!/bin/bash
# The paper's Countdown run on Qwen2.5-7B-Instruct (configs/countdown_qwen2.5-7b.yaml) across several nodes:
# one rank per GPU, GPUs per node = tasks per node (2 nodes x 8 GPUs by default), srun --mpi=pmix.
#
#   export HPC_ES_MODELS=/shared/models          # holds Qwen2.5-7B-Instruct/ (or HPC_ES_MODEL=/path/to/it)
#   export HPC_ES_DATA=/shared/data              # holds countdown.json
#   export HPC_ES_RUN_DIR=/scratch/$USER/countdown-7b HPC_ES_PYTHON=$PWD/.venv/bin/python
#   sbatch slurm/es_multinode.sh                        # from the repository root
#   sbatch --partition=gpu --account=proj slurm/es_multinode.sh es.iterations=100    # sbatch options, overrides
#   sbatch --nodes=4 --ntasks-per-node=4 slurm/es_multinode.sh   # 4 nodes x 4 GPUs
#
# Settings (environment, exported to the job by sbatch):
#   HPC_ES_MODEL    model folder (default: $HPC_ES_MODELS/Qwen2.5-7B-Instruct)
#   HPC_ES_RUN_DIR  run folder: ledger, checkpoints, final model (default: runs/countdown_qwen2.5-7b under
#                   the submit folder); resubmitting with the same folder resumes the run
#   HPC_ES_CONFIG   config (default: configs/countdown_qwen2.5-7b.yaml)
#   HPC_ES_PYTHON   python with hpc_es installed (default: python)
#   HPC_ES_MPI      srun --mpi plugin: pmix for Open MPI (default), pmi2 for MPICH (a wrong one makes every
#                   rank a world of 1)
#   HPC_ES_SRUN_ARGS  extra srun arguments
# Any config works (HPC_ES_CONFIG); ranks only exchange a few numbers per iteration, so an ordinary
# network between nodes is enough.  Nodes must see the same model, data and run folders (shared filesystem).
# Each task (rank) is bound to one GPU of its own (--gpus-per-task=1), the one nearest its CPUs
# (--gpu-bind=closest): it sees only that GPU, so no rank touches another's; GPUs per node = tasks per node.
# Arguments after the script are config overrides (key=value).  Bad input (no model folder, a run folder
# that cannot be written, an unknown config key) stops the job at once, before any rank starts.
# Time limit or preemption: SIGUSR2 reaches the ranks 180 s before the limit; they finish the iteration,
# checkpoint and exit 75, and the job requeues itself and resumes from HPC_ES_RUN_DIR.
#SBATCH --job-name=hpc_es-mn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --gpu-bind=closest
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=hpc_es-mn-%j.out

# sbatch runs a copy of this script: find the repository (for common.sh and configs/) from the path
# Slurm recorded at submission, HPC_ES_HOME, or the submit folder.
for d in "${HPC_ES_HOME:-}" "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null |
         sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-$PWD}"; do
    [[ -n $d && -f $d/slurm/common.sh ]] && { HPC_ES_HOME=$(cd "$d" && pwd); break; }
done
[[ -f ${HPC_ES_HOME:-}/slurm/common.sh ]] || { echo "hpc_es: error: cannot find the hpc_es repository; set HPC_ES_HOME" >&2; exit 2; }
source "$HPC_ES_HOME/slurm/common.sh"

: "${HPC_ES_CONFIG:=$HPC_ES_HOME/configs/countdown_qwen2.5-7b.yaml}"
: "${HPC_ES_MODEL:=${HPC_ES_MODELS:+$HPC_ES_MODELS/Qwen2.5-7B-Instruct}}"
: "${HPC_ES_RUN_DIR:=${SLURM_SUBMIT_DIR:-$PWD}/runs/countdown_qwen2.5-7b}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

hpc_es_preflight "$@"
hpc_es_launch
