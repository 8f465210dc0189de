#!/bin/bash
# The body of slurm/train.sbatch and slurm/serve.sbatch (run inside the batch step):
#   launch.sh train|serve CONFIG.toml [--set key=value ...]
# Checks the config against the allocation before anything starts, then runs one torchrun agent per
# node through srun. Per-rank logs go to ${LOG_DIR:-logs/JOB_ID}/node-N/.
set -euo pipefail
COMMAND=${1:?usage: launch.sh train|serve CONFIG.toml [--set key=value ...]}
shift
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "dist slurm: not inside a SLURM job (SLURM_JOB_ID is unset): submit with sbatch slurm/$COMMAND.sbatch CONFIG.toml" >&2
  exit 2
fi
CONFIG=${1:?usage: sbatch slurm/$COMMAND.sbatch CONFIG.toml [--set key=value ...]}
shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NNODES=${SLURM_JOB_NUM_NODES:?SLURM_JOB_NUM_NODES is unset}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}   # "h100:8" -> 8
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads it all: no SIGPIPE under pipefail
export MASTER_ADDR=$HEAD_NODE MASTER_PORT=${MASTER_PORT:-29500}
export LOG_DIR=${LOG_DIR:-logs/$SLURM_JOB_ID}

# One clear line, before any rank starts, when the config does not fit the allocation.
python3 - "$COMMAND" "$CONFIG" "$NNODES" "$GPUS_PER_NODE" "$@" <<'PY'
import sys

from dist.config import ConfigError, check_world, load_config
from dist.launch import parse_args

command, config, nodes, gpus = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
args = parse_args([command, "--config", config, *sys.argv[5:]])
try:
    cfg = load_config(args.config, args.overrides)
    check_world(cfg, nodes * gpus)
    sp = cfg.sp.degree
    if (sp < gpus and gpus % sp) or (sp > gpus and sp % gpus):
        raise ConfigError(f"config key 'sp.degree' ({sp}) must divide the GPUs per node ({gpus}) or be a "
                          f"multiple of them, so that no sequence-parallel group straddles a node unevenly")
except ConfigError as e:
    sys.exit(f"dist slurm: {nodes} nodes x {gpus} GPUs: {e}")
PY

# NCCL over InfiniBand when present. For your fabric set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the
# interface the nodes reach each other on), NCCL_IB_HCA (which HCAs), NCCL_DEBUG=INFO to see what NCCL picked.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# --max-restarts: a lost rank brings the job back; it resumes from the newest in-memory snapshot
# (fault.snapshot_every) or checkpoint.resume = "latest".
export DIST_NNODES=$NNODES DIST_GPUS_PER_NODE=$GPUS_PER_NODE DIST_MAX_RESTARTS=${MAX_RESTARTS:-3}
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash "$HERE/node.sh" "$COMMAND" --config "$CONFIG" "$@"
