#!/usr/bin/env bash
# The main job on a fresh machine: install (.venv), then a small federated DEeR run with DP on PneumoniaMNIST.
# Extra arguments go to train/fed.py (e.g. --overwrite, --method lora).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train/fed.py --config train/configs/pneumonia_deer.yaml "$@"
