#!/bin/bash
# One node's torchrun agent (run by srun from launch.sh, once per node).
# train: c10d rendezvous hosted on the first node (elastic restarts);
# serve: static node ranks (node N holds ranks N*G .. N*G+G-1), so the router, rank 0, is on the first node.
set -euo pipefail
COMMAND=$1
shift
NODE=${SLURM_NODEID:?SLURM_NODEID is unset: run through srun}
if [[ "$COMMAND" == serve ]]; then
  RDZV=(--node-rank "$NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
else
  RDZV=(--rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT")
fi
exec torchrun --nnodes "$DIST_NNODES" --nproc-per-node "$DIST_GPUS_PER_NODE" "${RDZV[@]}" \
  --max-restarts "$DIST_MAX_RESTARTS" --log-dir "$LOG_DIR/node-$NODE" --redirects 3 --tee 3 \
  -m dist.launch "$COMMAND" "$@"
