#!/bin/bash

# Parameters
#SBATCH --account=proj
#SBATCH --cpus-per-task=8
#SBATCH --error=/logs/%j/%j_0_log.err
#SBATCH --gpus-per-node=4
#SBATCH --job-name=es-countdown
#SBATCH --mem=200GB
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=/logs/%j/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@180
#SBATCH --time=720
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /logs/%j/%j_%t_log.out --error /logs/%j/%j_%t_log.err --mpi=pmix PYTHON -u -m submitit.core._submit /logs/%j
