"""Many processes on one CPU (gloo): torchrun, torch.distributed.launch, two "nodes" on localhost,
processes started as srun starts them (SLURM_* variables only), a failing rank, and the ModelZoo's
launcher scripts with their CPU overrides.

Runs are shared through module-scoped fixtures: one run serves several tests.

Why 2 processes x batch b must match 1 process x batch 2b exactly (up to float rounding):
- data: EpochBatchSampler gives rank r every world_size-th index of the epoch's permutation, so
  the ranks' k-th batches together are the single process's k-th batch, and each image's
  augmentation is seeded by (seed, epoch, index), not by the rank;
- gradients: DDP averages the ranks' gradients of their mean losses over equal batches, which is
  the gradient of the mean loss over the union; the logged loss is the same all-reduced mean;
- BatchNorm is what would break it: in training mode each rank normalizes with its own batch's
  statistics, and torch's SyncBatchNorm does not run on the CPU. --freeze-bn makes BN normalize
  with its running statistics (a fine-tuning option), which do not depend on how the batch is
  split. Drop rates are 0 and there is no mixup, cutmix or random erasing, whose draws would
  differ per rank. A small learning rate (SGD, 3e-5) keeps the un-normalized network from diverging;
  not gradient clipping, which would hide a gradient of the wrong scale (e.g. accumulated micro-batches
  summed instead of averaged: with lr 1e-2 and clipping at 1 such a bug went unnoticed).
  Colour jitter is off (--color-jitter 0; its draws are per image and seeded, so it would not
  differ per rank): with it this un-normalized net diverged (losses 1.75 -> 239 -> 160), and a
  diverging run turns float-rounding differences into different numbers.
"""

import csv
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

import cluster
import devices
import distributed
import errors
from conftest import BESIDE_FILES, ROOT, RUNTIME_FILES, make_image_folder, run_train, summary_rows

ENV = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
TINY = ['--img-size', '32', '-j', '0']
# A recipe whose result does not depend on how a batch is split over processes (module docstring).
EXACT = [
    *TINY,
    *'--epochs 2 --log-interval 1 --freeze-bn --warmup-epochs 0 --opt sgd --lr 3e-5 --model-ema'.split(),
    *'--model-ema-decay 0.5 --seed 3 --color-jitter 0'.split(),
]
TIMEOUT = 300


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(launcher_args, train_args, env=None, check=True, script=('train.py',)):
    """python -m LAUNCHER ... train.py ARGS in the repo root -> CompletedProcess (+ .seconds)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, '-m', *launcher_args, *script, *map(str, train_args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=dict(ENV, **(env or {})),
    )
    result.seconds = time.perf_counter() - start
    if check and result.returncode != 0:
        raise AssertionError(
            f'{launcher_args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}'
        )
    return result


def torchrun(processes, train_args, **kwargs):
    return launch(
        ['torch.distributed.run', f'--nproc_per_node={processes}', f'--master_port={free_port()}'], train_args, **kwargs
    )


def losses(stdout):
    return [float(x) for x in re.findall(r'^Train: .*?Loss: (\S+)', stdout, re.M)]


def evaluation(stdout, label='Evaluation'):
    found = re.search(rf'^{re.escape(label)}: loss (\S+)  top1 (\S+)  top5 (\S+)$', stdout, re.M)
    return [float(x) for x in found.groups()]


def summary(output):
    with open(os.path.join(output, 'summary.csv')) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """14 training images (not a multiple of 4 or 3), 7 validation images (prime)."""
    return make_image_folder(tmp_path_factory.mktemp('dist') / 'data', classes=7, train_per_class=2, val_per_class=1)


@pytest.fixture(scope='module')
def one_process(data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp('one') / 'run'
    result = run_train(data_dir, *EXACT, '-b', '4', '--output', output, env={'OMP_NUM_THREADS': '1'})
    return dict(output=str(output), stdout=result.stdout)


@pytest.fixture(scope='module')
def two_processes(data_dir, tmp_path_factory):
    """The ModelZoo's launcher: torch.distributed.launch, which passes --local-rank=K."""
    output = tmp_path_factory.mktemp('two') / 'run'
    dtypes = output.parent / 'dtypes'  # tools/faults.py only watches: which dtypes validation and collectives use,
    teardown = output.parent / 'teardown'  # and what outlives the process group
    result = launch(
        ['torch.distributed.launch', '--nproc_per_node=2', f'--master_port={free_port()}'],
        [data_dir, *EXACT, '-b', '2', '--output', output],
        script=('tools/faults.py', '--record-dtypes', dtypes, '--record-teardown', teardown, '--'),
    )
    return dict(output=str(output), stdout=result.stdout, dtypes=dtypes, teardown=teardown)


def test_two_processes_of_batch_b_train_like_one_process_of_batch_2b(one_process, two_processes):
    expected = losses(one_process['stdout'])
    assert len(expected) == 6  # 2 epochs x 3 steps, every step logged
    assert losses(two_processes['stdout']) == pytest.approx(expected, rel=2e-3)
    single = torch.load(os.path.join(one_process['output'], 'last.pth.tar'), weights_only=True)
    double = torch.load(os.path.join(two_processes['output'], 'last.pth.tar'), weights_only=True)
    for key in ('model', 'model_ema'):  # EMA kept alike on every rank, saved by rank 0
        assert single[key].keys() == double[key].keys()
        differ = [
            name
            for name, tensor in single[key].items()
            if not torch.allclose(double[key][name].double(), tensor.double(), rtol=1e-4, atol=1e-5)
        ]
        assert not differ, f'{key}: {differ[:5]}'


@pytest.fixture(scope='module')
def accumulating(data_dir, tmp_path_factory):
    """One process, batch 2, two micro-batches per optimizer step: the two processes' global batch of 4."""
    output = tmp_path_factory.mktemp('accumulating') / 'run'
    result = run_train(
        data_dir, *EXACT, '-b', '2', '--grad-accum-steps', '2', '--output', output, env={'OMP_NUM_THREADS': '1'}
    )
    return dict(output=str(output), stdout=result.stdout)


def test_one_process_accumulating_two_micro_batches_trains_like_two_processes(accumulating, two_processes):
    """The same images per step (the sampler's first 4 of the permutation, split 2 + 2 either way), the
    gradient the mean over them: equal up to float rounding, the tolerance of the 1-vs-2-process test
    (losses within 0.2%, weights within rtol 1e-4, atol 1e-5)."""
    assert losses(accumulating['stdout']) == pytest.approx(losses(two_processes['stdout']), rel=2e-3)
    assert len(losses(accumulating['stdout'])) == 6  # optimizer steps: 2 epochs x 3
    single = torch.load(os.path.join(accumulating['output'], 'last.pth.tar'), weights_only=True)
    double = torch.load(os.path.join(two_processes['output'], 'last.pth.tar'), weights_only=True)
    assert single['num_updates'] == double['num_updates'] == 6
    for key in ('model', 'model_ema'):
        differ = [
            name
            for name, tensor in single[key].items()
            if not torch.allclose(double[key][name].double(), tensor.double(), rtol=1e-4, atol=1e-5)
        ]
        assert not differ, f'{key}: {differ[:5]}'
    for one, two in zip(summary(accumulating['output']), summary(two_processes['output'])):
        assert float(one['eval_top1']) == float(two['eval_top1'])
        assert float(one['eval_loss']) == pytest.approx(float(two['eval_loss']), rel=1e-3)


def test_lr_base_scales_the_lr_with_the_global_batch_and_says_so(data_dir, tmp_path):
    """timm 1.x's rule: lr = lr_base x global batch / lr_base_size (linear; sqrt for adaptive optimizers)."""
    result = torchrun(
        2,
        [
            data_dir,
            *TINY,
            *'--epochs 1 --warmup-epochs 0 --perf-steps 1 -b 2 --grad-accum-steps 3 --opt sgd --lr-base 0.1'.split(),
            *'--lr-base-size 4 --output'.split(),
            tmp_path / 'run',
        ],
    )
    assert 'batch 12 (2 per process x 3 accumulated), lr 0.3 (--lr-base 0.1 per 4 images, linear)' in result.stdout
    assert 'LR: 3.000e-01' in result.stdout


# timm 0.5.4's validation line: each value is the batch's, in brackets the average so far.
TEST_LINE = re.compile(
    r'^Test(?: \(EMA\))?: \[ *\d+/\d+\]  Time: \d+\.\d{3} \(\d+\.\d{3}\)  '
    r'Loss: +\d+\.\d{4} \( *\d+\.\d{4}\)  Acc@1: +\d+\.\d{4} \( *\d+\.\d{4}\)  '
    r'Acc@5: +\d+\.\d{4} \( *\d+\.\d{4}\)$'
)


def untimed_test_lines(stdout):
    """The Test lines without their timings."""
    return [re.sub(r'Time: \S+ \(\S+\)', 'Time', line) for line in stdout.splitlines() if line.startswith('Test')]


def test_test_lines_follow_timms_format_and_two_processes_print_one_process_numbers(one_process, two_processes):
    """With 2 processes the values are over both ranks' images: the same batches of 4 as one process
    of batch 4 (7 images: a batch of 4, then one of 3 split as 2 + 1), so the same lines."""
    lines = [line for line in one_process['stdout'].splitlines() if line.startswith('Test')]
    assert len(lines) == 2 * 2 * 2 and all(TEST_LINE.match(line) for line in lines), lines[:2]
    assert untimed_test_lines(two_processes['stdout']) == untimed_test_lines(one_process['stdout'])


def test_validation_and_collectives_never_use_float64(two_processes):
    """Ascend's HCCL reduces no float64 (logs.EvalLogger cites the table): validation makes none and
    every all-reduce carries float32 or int32 (all_gather_object's own transport: uint8 and int64)."""
    for rank in (0, 1):
        with open(f'{two_processes["dtypes"]}.rank{rank}.json') as f:
            seen = json.load(f)
        assert seen['validation'] and 'torch.float64' not in seen['validation'], seen
        assert {'torch.float32', 'torch.int32'} <= set(seen['collectives']), seen
        assert set(seen['collectives']) <= {'torch.float32', 'torch.int32', 'torch.uint8', 'torch.int64'}, seen


def test_no_ddp_module_outlives_the_process_group(two_processes):
    """Rank 0 draws curves.png, and matplotlib keeps the frames of its callers, train() with its DDP module, in a
    reference cycle: unless collected before the group is destroyed, the module ends with the interpreter and gloo's
    threads abort it now and then ('terminate called without an active exception': 1 exit in 10 under load)."""
    for rank in (0, 1):
        assert open(f'{two_processes["teardown"]}.rank{rank}.txt').read() == '0', rank


def test_rank_0_alone_logs(two_processes):
    assert len(re.findall(r'^Train: ', two_processes['stdout'], re.M)) == 6
    assert len(re.findall(r'^Epoch \d+: ', two_processes['stdout'], re.M)) == 2
    assert two_processes['stdout'].count('*** Best metric') == 1


@pytest.fixture(scope='module')
def two_nodes(data_dir, one_process):
    """--evaluate of the one-process checkpoint on 3 processes over 2 "nodes" on localhost: two
    torchrun agents, node 0 with 2 processes, node 1 with 1. -> (node 0 output, node 1 output)."""
    checkpoint = os.path.join(one_process['output'], 'last.pth.tar')
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                '-m',
                'torch.distributed.run',
                '--nnodes=2',
                f'--node_rank={node}',
                f'--nproc_per_node={processes}',
                '--master_addr=127.0.0.1',
                f'--master_port={port}',
                'train.py',
                data_dir,
                '--evaluate',
                '--resume',
                checkpoint,
                *TINY,
                '-b',
                '2',
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
        )
        for node, processes in ((0, 2), (1, 1))
    ]
    outputs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    return outputs


def test_distributed_validation_counts_every_image_once(one_process, two_processes, two_nodes):
    """7 images on 1, 2 and 3 processes give the same loss and accuracies: the shards are 7,
    4+3 and 3+2+2 images, none padded, and the sums are all-reduced."""
    row = summary(one_process['output'])[-1]
    expected = [float(row['eval_loss']), float(row['eval_top1']), float(row['eval_top5'])]
    two_row = summary(two_processes['output'])[-1]  # validated on 2 ranks at the end of training
    assert [float(two_row[k]) for k in ('eval_loss', 'eval_top1', 'eval_top5')] == pytest.approx(expected, abs=1e-4)
    assert evaluation(two_nodes[0]) == pytest.approx(expected, abs=1e-4)
    assert evaluation(two_nodes[0], 'Evaluation (EMA)')[1] == pytest.approx(float(row['ema_top1']), abs=1e-4)


def test_two_nodes_on_localhost_run_one_job_logged_by_rank_0(two_nodes):
    assert two_nodes[0].count('Evaluation:') == 1
    assert 'Evaluation' not in two_nodes[1]  # rank 2 lives on node 1 and stays quiet


def test_a_failing_rank_stops_the_run_with_its_error_said_once(data_dir, tmp_path):
    result = torchrun(
        2,
        [data_dir, *TINY, '-b', '2', '--output', tmp_path / 'run'],
        check=False,
        script=('tools/faults.py', '--fail-rank', '1', '--'),
    )  # rank 1 raises after a step
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert result.seconds < 120  # torchrun stops the other rank: no collective timeout, no hang
    assert text.count('RuntimeError: failure injected on rank 1') == 1
    assert re.search(r'^\[rank1\]: RuntimeError: failure injected on rank 1', text, re.M)
    assert 'rank 0 stops: another rank failed' in text


# ------------------------------------------------------------------------------------------------
# Slurm without torchrun: `srun python train.py ...` starts every process itself

LAUNCHER_VARIABLES = (
    *'RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT GROUP_RANK'.split(),
    *'TORCHELASTIC_USE_AGENT_STORE TORCHELASTIC_RESTART_COUNT'.split(),
)


def srun_env(procid, ntasks, job_id, **extra):
    """What srun gives task `procid` of a one-node step (and no torchrun variables)."""
    env = {key: value for key, value in ENV.items() if key not in LAUNCHER_VARIABLES and not key.startswith('SLURM_')}
    slurm = dict(
        SLURM_JOB_ID=str(job_id),
        SLURM_PROCID=str(procid),
        SLURM_LOCALID=str(procid),
        SLURM_NTASKS=str(ntasks),
        SLURM_STEP_NUM_TASKS=str(ntasks),
        SLURM_STEP_ID='0',
        SLURM_JOB_NODELIST='localhost',
        SLURM_STEP_NODELIST='localhost',
    )
    return dict(env, **slurm | extra)


@pytest.mark.parametrize(
    'nodelist, first',
    [
        ('localhost', 'localhost'),
        ('node[01-03,07],gpu5', 'node01'),
        ('gpu5,node[01-03]', 'gpu5'),
        ('rack[2-3]-n[4,6]', 'rack2-n4'),
        ('n[7]', 'n7'),
        ('a-1,b', 'a-1'),
    ],
)
def test_the_master_is_the_first_host_of_slurms_compressed_host_list(nodelist, first):
    assert cluster.first_host(nodelist) == first


def clear_launcher_variables(monkeypatch):
    """No launcher's variables, each set and deleted through monkeypatch: what the code sets is undone too."""
    for key in [*LAUNCHER_VARIABLES, *(key for key in os.environ if key.startswith('SLURM_'))]:
        monkeypatch.setenv(key, '')
        monkeypatch.delenv(key)


def test_srun_variables_give_rank_world_size_and_the_master_torchruns_win(monkeypatch):
    clear_launcher_variables(monkeypatch)
    for key, value in srun_env(3, 8, 123456, SLURM_STEP_NODELIST='gpu[4-5]').items():
        monkeypatch.setenv(key, value)
    assert distributed.distributed_env() == (3, 8, 3)
    assert (os.environ['MASTER_ADDR'], os.environ['MASTER_PORT']) == ('gpu4', str(10000 + 123456 % 20000))
    monkeypatch.setenv('MASTER_PORT', '29400')
    distributed.distributed_env()
    assert os.environ['MASTER_PORT'] == '29400'  # given: kept
    for key, value in dict(RANK='1', WORLD_SIZE='2', LOCAL_RANK='1', MASTER_ADDR='host0').items():
        monkeypatch.setenv(key, value)  # torchrun started inside an salloc or srun shell
    assert distributed.distributed_env() == (1, 2, 1) and os.environ['MASTER_ADDR'] == 'host0'


def test_a_batch_script_without_srun_is_one_process(monkeypatch):
    """sbatch --ntasks=4 gives the script SLURM_PROCID=0 and SLURM_NTASKS=4 too, but no step."""
    clear_launcher_variables(monkeypatch)
    for key, value in dict(SLURM_JOB_ID='7', SLURM_PROCID='0', SLURM_LOCALID='0', SLURM_NTASKS='4').items():
        monkeypatch.setenv(key, value)
    assert distributed.distributed_env() == (0, 1, 0)


def test_srun_tasks_bound_to_gpus_of_their_own_each_take_the_first_they_see(monkeypatch):
    """srun --gpus-per-task=1 (or --ntasks-per-gpu=1): each of 8 tasks sees one GPU, its own, while SLURM_LOCALID
    runs 0-7, so a task would ask for a GPU it cannot see; bound tasks take local rank 0. Unbound, a local rank
    beyond the visible GPUs stays a usage error."""
    clear_launcher_variables(monkeypatch)
    for key, value in srun_env(5, 8, 1).items():
        monkeypatch.setenv(key, value)
    assert distributed.distributed_env() == (5, 8, 5)
    for binding in ('SLURM_GPUS_PER_TASK', 'SLURM_NTASKS_PER_GPU'):
        monkeypatch.setenv(binding, '1')
        assert distributed.distributed_env() == (5, 8, 0)
        monkeypatch.delenv(binding)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda index: None)
    assert devices.select_device('cuda', 0) == torch.device('cuda', 0)
    with pytest.raises(errors.UsageError, match='process 5 has no GPU: 1 visible'):
        devices.select_device('cuda', 5)


def free_slurm_job_id():
    """A job id whose port (10000 + id % 20000, cluster.slurm_env) is free now."""
    for port in random.Random().sample(range(10000, 30000), 200):
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue
        return 4_000_000 + port - 10000  # 4,000,000 % 20000 == 0
    raise AssertionError('no free port in 10000-29999')


@pytest.fixture(scope='module')
def slurm_processes(data_dir, tmp_path_factory):
    """The exact recipe on 2 processes started as srun starts them: only SLURM_* variables."""
    output = tmp_path_factory.mktemp('slurm') / 'run'
    job_id = free_slurm_job_id()
    tasks = [
        subprocess.Popen(
            [sys.executable, 'train.py', data_dir, *EXACT, '-b', '2', '--output', output],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=srun_env(procid, 2, job_id),
        )
        for procid in (0, 1)
    ]
    outputs = [task.communicate(timeout=TIMEOUT)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    return dict(output=str(output), stdout=outputs[0], rank_1=outputs[1])


def test_two_processes_started_with_only_slurm_variables_train_together(slurm_processes, two_processes):
    """The same numbers as torch.distributed.launch's 2 processes, logged by rank 0 alone."""
    assert losses(slurm_processes['stdout']) == losses(two_processes['stdout'])
    assert untimed_test_lines(slurm_processes['stdout']) == untimed_test_lines(two_processes['stdout'])
    assert summary_rows(slurm_processes['output']) == summary_rows(two_processes['output'])
    assert 'Train:' not in slurm_processes['rank_1'] and 'Test' not in slurm_processes['rank_1']


# ------------------------------------------------------------------------------------------------
# The ModelZoo's launcher scripts, run from a copy of the repository (they write test/output/ there)


@pytest.fixture(scope='module')
def repo_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp('repo')
    for name in RUNTIME_FILES + BESIDE_FILES:  # the project's scripts: random images without --data_path
        shutil.copy(os.path.join(ROOT, name), root)
    shutil.copytree(
        os.path.join(ROOT, 'test'), root / 'test', ignore=shutil.ignore_patterns('output', '__pycache__', '*.py')
    )
    return root


def run_script(repo, script, *args, cwd=None, **env):
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH']  # python3 = this one
    return subprocess.run(
        ['bash', f'test/{script}' if cwd is None else script, *args],
        cwd=cwd or repo,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=dict(ENV, PATH=path, DEVICE='cpu', **env),
    )


def final_value(stdout, label):
    return re.search(rf'^{re.escape(label)} : (\S+)$', stdout, re.M).group(1)


def case_log(repo, case_name):
    with open(repo / 'test' / 'output' / '0' / f'{case_name}.log') as f:
        return dict(line.split(' = ', 1) for line in f.read().splitlines())


def test_performance_8p_script_runs_two_processes_on_synthetic_images(repo_copy):
    result = run_script(
        repo_copy, 'train_performance_8p.sh', NPROC_PER_NODE='2', TRAIN_ARGS='-b 2 --img-size 32 -j 0 --perf-steps 2'
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert 'synthetic dataset' in result.stdout
    assert float(final_value(result.stdout, 'Final Performance images/sec')) > 0
    assert int(final_value(result.stdout, 'E2E Training Duration sec')) >= 0
    log = case_log(repo_copy, 'EfficientNetV2_for_Pytorch_bs2_2p_perf')
    assert log['Network'] == 'EfficientNetV2_for_Pytorch' and log['RankSize'] == '2'
    assert log['BatchSize'] == '2' and log['DeviceType'] == os.uname().machine
    for key in ('ActualFPS', 'TrainingTime', 'ActualLoss', 'E2ETrainingTime'):
        float(log[key])
    train_log = (repo_copy / 'test' / 'output' / '0' / 'train_0.log').read_text()
    assert train_log.count('Train:') == 2
    assert f'Training log: {repo_copy / "test" / "output" / "0" / "train_0.log"}' in result.stdout
    assert re.search(r'^Train: 0 \[   0/', result.stdout, re.M)  # progress shown while it runs


def test_full_1p_script_trains_from_test_folder_and_reports_accuracy(repo_copy, data_dir):
    result = run_script(
        repo_copy,
        'train_full_1p.sh',
        f'--data_path={data_dir}',
        '--epochs=1',
        cwd=repo_copy / 'test',
        TRAIN_ARGS='-b 4 --img-size 32 -j 0',
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert 0 <= float(final_value(result.stdout, 'Final Train Accuracy')) <= 100
    assert re.search(r'^Epoch 0: train_loss ', result.stdout, re.M)  # the epoch's summary, as it came
    assert float(final_value(result.stdout, 'Final Performance images/sec')) > 0
    log = case_log(repo_copy, 'EfficientNetV2_for_Pytorch_bs4_1p_acc')
    assert log['RankSize'] == '1' and float(log['TrainAccuracy']) >= 0
    assert float(log['TrainingTime']) > 0 and float(log['ActualLoss']) > 0


def test_full_script_without_data_path_exits_1_with_the_modelzoo_message(repo_copy):
    result = run_script(repo_copy, 'train_full_8p.sh')
    assert result.returncode == 1
    assert result.stdout.strip() == '[Error] para "data_path" must be confing'
