#!/bin/bash
# The ModelZoo recipe's full-accuracy run on 8 devices of one node: 350 epochs at lr .112, batch 256 per device.
#     bash test/train_full_8p.sh --data_path=/data/imagenet [--epochs=N]
# Environment overrides (see modelzoo_launcher.sh): NPROC_PER_NODE, DEVICE, TRAIN_ARGS.
source "$(dirname "${BASH_SOURCE[0]}")/modelzoo_launcher.sh" full 8 .112 "$@"
