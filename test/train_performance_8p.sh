#!/bin/bash
# The ModelZoo recipe's throughput run on 8 devices of one node: 100 steps of batch 256 per device; without --data_path, synthetic images.
#     bash test/train_performance_8p.sh [--data_path=/data/imagenet] [--epochs=N]
# Environment overrides (see modelzoo_launcher.sh): NPROC_PER_NODE, DEVICE, TRAIN_ARGS.
source "$(dirname "${BASH_SOURCE[0]}")/modelzoo_launcher.sh" performance 8 .112 "$@"
