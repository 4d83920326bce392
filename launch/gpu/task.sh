#!/bin/bash
# One SLURM task of a neo-jax run (started by srun from train.sbatch): give it its process id and, in
# per-GPU mode, its one GPU, then run the command given as arguments.
set -euo pipefail
export NEO_PROCESS_ID="${SLURM_PROCID:?task.sh runs under srun}"
if [[ "${NEO_PER_GPU:-0}" == 1 ]]; then
  export CUDA_VISIBLE_DEVICES="${SLURM_LOCALID:?SLURM_LOCALID unset}"
fi
exec "$@"
