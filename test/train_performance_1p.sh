#!/bin/bash
# The ModelZoo recipe's throughput run on 1 device: 100 steps of batch 256; without --data_path, synthetic images.
#     bash test/train_performance_1p.sh [--data_path=/data/imagenet] [--epochs=N]
# Environment overrides (see modelzoo_launcher.sh): NPROC_PER_NODE, DEVICE, TRAIN_ARGS.
source "$(dirname "${BASH_SOURCE[0]}")/modelzoo_launcher.sh" performance 1 .014 "$@"
