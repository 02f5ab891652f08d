#!/usr/bin/env bash
# main.py on several nodes with torchrun: run this script once on every node, with the same NNODES, MASTER_ADDR and
# MASTER_PORT; NODE_RANK is 0 on the master node and 1, 2, ... on the others.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS=8 bash scripts/launch/torchrun.sh --base configs/ldm/txt2img.yaml -t
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 GPUS=8 bash scripts/launch/torchrun.sh --base configs/ldm/txt2img.yaml -t
#
# Lightning reads torchrun's environment (ranks, world size); the trainer is told the same topology. The effective
# learning rate is base_learning_rate x accumulate_grad_batches x NNODES x GPUS x batch size (--scale_lr, on by
# default), printed once by rank 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
: "${GPUS:=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$GPUS" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    main.py "$@" lightning.trainer.num_nodes="$NNODES" lightning.trainer.devices="$GPUS" \
    lightning.trainer.strategy=ddp
