#!/bin/bash
# Run on EVERY node:  NODE_RANK=0 MASTER_ADDR=node0 bash configs/multinode/torchrun_fsdp2.sh   (then NODE_RANK=1 ...)
# torchrun starts one process per GPU; Lightning picks up torchrun's environment.
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NNODES=${NNODES:-2}
GPUS=${GPUS:-8}
.venv/bin/python -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    -m effilora_lightning fit --config configs/multinode/llama3-8b_effilora_fsdp2.yaml \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS" "$@"
