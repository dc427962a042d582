"""Jobs beyond one torchrun, beside the copy: Slurm's srun starting every process itself, and torchrun restarting a
failed group (--max-restarts). distributed.py imports this only for them.

    srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 python train.py ...   # ranks from Slurm's variables
    torchrun --max-restarts 3 ... train.py ... --output DIR --resume auto      # a failed group starts again
"""

import os
import re
import time

import torch.distributed as dist


def slurm_env():
    """(rank, world_size, local_rank) of a task of an srun step, as TensorFlow's SlurmClusterResolver reads them:
    the step's task count, so a batch script's own `python train.py` is one process despite SLURM_NTASKS=N.

    The ranks meet at the step's first node, on a port from the job id (jobs sharing a node differ, where torch's
    29500 would collide; below the ephemeral ports, 32768), unless MASTER_ADDR and MASTER_PORT say otherwise. Tasks
    bound to GPUs of their own (--gpus-per-task, --ntasks-per-gpu) see only those, while SLURM_LOCALID counts the
    node's tasks: each takes the first it sees (local rank 0)."""
    nodelist = os.environ.get('SLURM_STEP_NODELIST') or os.environ.get('SLURM_JOB_NODELIST')
    if nodelist:
        os.environ.setdefault('MASTER_ADDR', first_host(nodelist))
    if 'SLURM_JOB_ID' in os.environ:
        os.environ.setdefault('MASTER_PORT', str(10000 + int(os.environ['SLURM_JOB_ID']) % 20000))
    bound = 'SLURM_GPUS_PER_TASK' in os.environ or 'SLURM_NTASKS_PER_GPU' in os.environ
    local_rank = 0 if bound else int(os.environ['SLURM_LOCALID'])
    return int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_STEP_NUM_TASKS']), local_rank


def first_host(nodelist):
    """The first host of a Slurm host list: 'node[01-03,07],gpu5' -> 'node01', 'rack[2-3]-n[4,6]' ->
    'rack2-n4' (the part before the first comma outside brackets, each bracket by its first value)."""
    first = re.match(r'[^,\[]*(?:\[[^\]]*\][^,\[]*)*', nodelist).group(0)
    return re.sub(r'\[([^\]\-,]*)[^\]]*\]', r'\1', first)


def restart_safe_store(rank, world_size, timeout):
    """The store where a group meets under torchrun --max-restarts, in keys of its own: torchrun's store outlives
    its workers, and a restarted group read the dead group's addresses there and failed or hung
    (pytorch/pytorch#167288). Otherwise as torch's env:// makes it: a client of torchrun's store."""
    agent = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
    server = rank == 0 and not agent
    host = os.environ['MASTER_ADDR']
    port = int(os.environ['MASTER_PORT'])
    tcp = dist.TCPStore(host, port, world_size, is_master=server, timeout=timeout, multi_tenant=not agent)
    store = dist.PrefixStore('default_pg', tcp)
    return dist.PrefixStore(fresh_key_space(store, rank, world_size, timeout), store) if agent else store


def fresh_key_space(store, rank, world_size, timeout):
    """A prefix no earlier group used: rank 0 names it after a random token, handed to each rank under a key named
    after the rank's own random token, which no dead process can have written. Not the restart count: each torchrun
    agent counts its own (under c10d, not after a membership change), so nodes would disagree
    (pytorch/pytorch#108158)."""
    token = os.urandom(8).hex()
    if rank > 0:
        store.set(f'hello/{rank}', token)
        store.wait([f'welcome/{token}'], timeout)
        space = store.get(f'welcome/{token}').decode()
        store.set(f'{space}/arrived/{rank}', '')
        return space
    deadline = time.monotonic() + timeout.total_seconds()
    waiting = set(range(1, world_size))
    while waiting:  # a rank's hello may still be a dead process's: read it again until the rank arrives
        if time.monotonic() > deadline:
            minutes = timeout.total_seconds() / 60
            raise TimeoutError(f'ranks {sorted(waiting)} did not join within {minutes:g} minutes (--dist-timeout)')
        for other in sorted(waiting):
            if store.check([f'{token}/arrived/{other}']):
                waiting.discard(other)
            elif store.check([f'hello/{other}']):
                store.set(f'welcome/{store.get(f"hello/{other}").decode()}', token)
        time.sleep(0.01)
    return token
