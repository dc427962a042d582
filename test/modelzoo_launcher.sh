#!/bin/bash
# The body of the Ascend ModelZoo recipe's four launchers (test/train_{full,performance}_{1p,8p}.sh),
# which source it:
#     source modelzoo_launcher.sh MODE PROCESSES LR "$@"      MODE: full | performance
# It keeps the ModelZoo contract: --data_path=DIR and --epochs=N, a log at
# test/output/$ASCEND_DEVICE_ID/train_$ASCEND_DEVICE_ID.log, the ModelZoo's grep/awk parsers, the
# "Final ..." lines and the ${CaseName}.log summary that ModelZoo dashboards read. While it runs it
# prints where the log is, the run's milestones (stages, epoch summaries, errors) and the latest
# Train: line at most every PROGRESS_SECONDS (default 60).
#
# Environment overrides, so the scripts also run on a laptop CPU:
#   NPROC_PER_NODE  processes (devices) on this node; default 1 or 8
#   DEVICE          train.py --device: auto (default), cuda, npu or cpu
#   TRAIN_ARGS      extra train.py arguments, appended last so they win, e.g. "-b 4 --img-size 64 -j 1"
mode=$1
RANK_SIZE=${NPROC_PER_NODE:-$2}
lr=$3
shift 3

Network="EfficientNetV2_for_Pytorch"
batch_size=256                      # per device, as the ModelZoo recipe
data_path=""
if [ "$mode" == "full" ]; then epochs=350; else epochs=1; fi

for para in "$@"; do
    if [[ $para == --data_path* ]]; then
        data_path=${para#*=}
    elif [[ $para == --epochs* ]]; then
        epochs=${para#*=}
    fi
done
# -b in TRAIN_ARGS wins over the recipe's 256; BatchSize and TrainingTime report the batch that ran.
previous=""
for word in ${TRAIN_ARGS:-}; do
    case "$previous" in -b|--batch-size) batch_size=$word ;; esac
    case "$word" in --batch-size=*) batch_size=${word#*=} ;; esac
    previous=$word
done

if [[ $data_path == "" ]]; then
    if [ "$mode" == "full" ]; then
        echo "[Error] para \"data_path\" must be confing"
        exit 1
    fi
    echo "No --data_path given: measuring throughput on the synthetic dataset (--dataset synthetic)"
    data_args=(--dataset synthetic)
else
    data_args=("$data_path")
fi

# The repo root and test/ from where this file lies, so the scripts run from the repo root,
# from test/ (the ModelZoo's two places) or from anywhere else.
test_path_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cur_path=$(dirname "$test_path_dir")
cd "$cur_path" || exit 1

export ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-0}
echo "device id is ${ASCEND_DEVICE_ID}"
# Ascend's CANN variables, only where the toolkit is installed.
if [ -d /usr/local/Ascend ] || [ -n "${ASCEND_HOME:-}" ]; then
    source "${test_path_dir}/env_npu.sh"
fi

output_dir=${test_path_dir}/output/${ASCEND_DEVICE_ID}
rm -rf "$output_dir"
mkdir -p "$output_dir"
log=${output_dir}/train_${ASCEND_DEVICE_ID}.log

if [ "$mode" == "performance" ]; then
    mode_args=(--perf-steps 100)
    case_kind=perf
else
    mode_args=()
    case_kind=acc
fi
if [ "$RANK_SIZE" -gt 1 ]; then
    launcher=(python3 -m torch.distributed.run --nproc_per_node="$RANK_SIZE")
else
    launcher=(python3)
fi

# The run's milestones as they reach the log, and a Train: line at most every PROGRESS_SECONDS.
progress() {
    local last=-100000 line
    while IFS= read -r line; do
        case "$line" in
            Train:*) if (( SECONDS - last >= ${PROGRESS_SECONDS:-60} )); then echo "$line"; last=$SECONDS; fi ;;
            "Epoch "*|"Stage "*|"Resumed from"*|"*** Best"*|error*|warning*|Output:*|Stopped*) echo "$line" ;;
        esac
    done
}

echo "Training log: ${log}"
start_time=$(date +%s)
# The ModelZoo recipe's command; TRAIN_ARGS last, unquoted: one word per argument.
nohup "${launcher[@]}" train.py "${data_args[@]}" \
    --model efficientnetv2_rw_t \
    -b 256 \
    --sched step \
    --epochs "${epochs}" \
    --decay-epochs 2.4 \
    --decay-rate .97 \
    --opt rmsproptf \
    --opt-eps .001 \
    -j 8 \
    --warmup-lr 4e-6 \
    --weight-decay 1e-5 \
    --drop 0.3 \
    --drop-connect 0.2 \
    --aa rand-m9-mstd0.5 \
    --lr "$lr" \
    --log-interval 1 \
    --img-size 288 \
    --apex-amp \
    --model-ema \
    --model-ema-decay 0.9999 \
    --mixup 0.2 \
    "${mode_args[@]}" \
    --device "${DEVICE:-auto}" \
    --output "${output_dir}/run" \
    ${TRAIN_ARGS:-} > "$log" 2>&1 &
pid=$!
tail -n +1 -F --pid=$pid "$log" 2> /dev/null | progress &
wait $pid
status=$?
wait
end_time=$(date +%s)
e2e_time=$(( end_time - start_time ))

echo "------------------ Final result ------------------"
if [ $status -ne 0 ]; then
    tail -n 20 "$log"
    echo "[Error] train.py exited with status ${status}; the whole log is ${log}"
    exit $status
fi
# The ModelZoo's parsers, verbatim: images/s is the running average of the last Train: line.
FPS=`grep -a 'Train:'  ${log}|awk 'END {print}'|awk -F "/s" '{print $2}'|awk '{print $2}'`
if [ "$mode" == "full" ]; then
    train_accuracy=`grep -a '*** Best metric: ' ${log}|awk 'END {print}'|awk '{print $4}'`
    echo "Final Train Accuracy : ${train_accuracy}"
fi
echo "E2E Training Duration sec : $e2e_time"

BatchSize=${batch_size}
DeviceType=`uname -m`
CaseName=${Network}_bs${BatchSize}_${RANK_SIZE}'p'_${case_kind}
ActualFPS=$FPS
TrainingTime=`awk 'BEGIN{printf "%.2f\n", '${batch_size}'*1000/'${FPS}'}'`
echo "Final Performance images/sec : $ActualFPS"

grep Train: ${log}|awk -F "Loss: " '{print $NF}' | awk -F " " '{print $1}' > ${output_dir}/train_${CaseName}_loss.txt
ActualLoss=`awk 'END {print}' ${output_dir}/train_${CaseName}_loss.txt`

{
    echo "Network = ${Network}"
    echo "RankSize = ${RANK_SIZE}"
    echo "BatchSize = ${BatchSize}"
    echo "DeviceType = ${DeviceType}"
    echo "CaseName = ${CaseName}"
    echo "ActualFPS = ${ActualFPS}"
    echo "TrainingTime = ${TrainingTime}"
    echo "ActualLoss = ${ActualLoss}"
    echo "E2ETrainingTime = ${e2e_time}"
    if [ "$mode" == "full" ]; then echo "TrainAccuracy = ${train_accuracy}"; fi
} > ${output_dir}/${CaseName}.log
