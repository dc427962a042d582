#!/bin/bash
# The ModelZoo recipe's full-accuracy run on 1 device: 350 epochs at lr .014, batch 256.
#     bash test/train_full_1p.sh --data_path=/data/imagenet [--epochs=N]
# Environment overrides (see modelzoo_launcher.sh): NPROC_PER_NODE, DEVICE, TRAIN_ARGS.
source "$(dirname "${BASH_SOURCE[0]}")/modelzoo_launcher.sh" full 1 .014 "$@"
