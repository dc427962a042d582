#!/bin/bash
# Ascend CANN environment for NPU runs. The launchers source it only where the toolkit is installed
# (/usr/local/Ascend exists or ASCEND_HOME is set); elsewhere nothing here is needed.
if [ -f /etc/Ascend/ascend_cann_install.info ]; then
    cann_path=$(grep Install_Path /etc/Ascend/ascend_cann_install.info | cut -d "=" -f 2)
else
    cann_path=${ASCEND_HOME:-/usr/local/Ascend}
fi
if [ -f "${cann_path}/ascend-toolkit/set_env.sh" ]; then
    source "${cann_path}/ascend-toolkit/set_env.sh"
elif [ -f "${cann_path}/nnae/set_env.sh" ]; then
    source "${cann_path}/nnae/set_env.sh"
else
    echo "env_npu.sh: no ascend-toolkit or nnae set_env.sh under ${cann_path}; CANN variables not set"
fi

export ASCEND_SLOG_PRINT_TO_STDOUT=0   # host logs to files, not the console
export ASCEND_GLOBAL_LOG_LEVEL=3       # 0 debug, 1 info, 2 warning, 3 error
export ASCEND_GLOBAL_EVENT_ENABLE=0
export TASK_QUEUE_ENABLE=1             # asynchronous operator dispatch
export COMBINED_ENABLE=1               # fuse discontiguous-tensor copies
export HCCL_WHITELIST_DISABLE=1
export HCCL_IF_IP=${HCCL_IF_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
if command -v msnpureport > /dev/null; then   # device-side logs: errors only, no events
    for device in 0 1 2 3 4 5 6 7; do msnpureport -g error -d $device > /dev/null; done
    msnpureport -e disable > /dev/null
fi
