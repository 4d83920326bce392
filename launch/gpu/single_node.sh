#!/bin/bash
# neo-jax on one machine with several GPUs: one process drives every visible GPU (no coordinator needed).
#
#   launch/gpu/single_node.sh configs/neo_2b.py:pt /data/runs/neo_2b_pt --config.mesh.fsdp=8
#   launch/gpu/single_node.sh --dry-run configs/neo_9b.py:sft /data/runs/neo_9b_sft
#   CUDA_VISIBLE_DEVICES=0,1,2,3 launch/gpu/single_node.sh ...     # a subset of the GPUs
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [--config.key=value ...]" >&2; exit 2
fi
CONFIG=$1 WORKDIR=$2; shift 2
for arg in "$@"; do
  [[ "$arg" == --config.* ]] || { echo "argument '$arg' is not a --config.key=value override" >&2; exit 2; }
done
NEO_JAX=${NEO_JAX:-neo-jax}
export PYTHONUNBUFFERED=1
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
CMD=("$NEO_JAX" train --config="$CONFIG" --workdir="$WORKDIR" "$@")
echo "export XLA_FLAGS=$XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
printf '%q ' "${CMD[@]}"; echo
[[ "$DRY_RUN" == 1 ]] && exit 0
exec "${CMD[@]}"
