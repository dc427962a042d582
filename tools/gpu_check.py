"""The engine of tools/gpu_check.sh: where the project stands on one CUDA GPU, in one command of at
most 8 minutes, with one summary table at the end (JSON and every stage's log in output/gpu_check/).

    bash tools/gpu_check.sh                 # on a machine with a CUDA GPU (the entry point)
    bash tools/gpu_check.sh --smoke         # every stage at toy sizes on whatever device is here, CPU too
    python tools/gpu_check.py [--smoke] [--budget SECONDS]

Stages, in the order they run; the seconds are each stage's budget on an H100/H200 (480 in all;
estimates from the project's reference numbers, not yet measured on a GPU):
   10  environment: card, driver, CUDA/cuDNN, torch/torchvision/timm, CPU cores (nvidia-smi, a probe)
  120  the CUDA tests: python -m pytest test -q -m cuda (test/test_cuda.py), pass/fail counts
   40  train.py --dataset synthetic, the reference recipe's flags (rw_t, rmsproptf, step schedule,
   40      EMA 0.9999, mixup 0.2, drop 0.3, drop-connect 0.2, aa rand-m9-mstd0.5) at 288 px, batch 256,
           100 steps, bf16 then fp16 (--amp), eager: images/s and peak GPU memory
   15  a folder of 500x375 JPEGs cut from scikit-learn's two sample photos (kept for the next run)
   45  train.py on that folder, bf16 eager, -j = this machine's cores: images/s against the
           synthetic run of the same settings says whether the input pipeline keeps the GPU fed
   45  bench.py --compare-timm, eager (the former test/gpu_bench.sh's command): step ours/timm
   80  train.py synthetic bf16 --compile
   85  bench.py --compare-timm --compile
    -  train.py synthetic fp16 --compile: only with the time the stages above left unused (>= 70 s)
A stage may use the time earlier stages left unused, never the budget of a later one; one that
runs out is killed (its process group) and reported as timed out; the whole stays within --budget.
The first step of every run pays cuDNN's autotuning (and compilation): train.py's running images/s
leaves the first steps out, and bench.py times only after its warm-up.

The goals next to the measurements are the project's: rw_t@288 bf16 >= 2,500 images/s eager on an
H100-class card; >= 1.2x timm's training step in the same bench.py run; compiled faster than eager.
The input pipeline is said to keep up when the JPEG run reaches 90% of the synthetic run (our
threshold). Exit status: 0 when every stage ran and no test failed (goals not met included), else 1.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, 'output', 'gpu_check')
PYTHON = sys.executable

BUDGET_SECONDS = 8 * 60
GOAL_BF16_EAGER_IMAGES_PER_SEC = 2500  # rw_t@288, batch 256, on an H100-class card
GOAL_STEP_OVER_TIMM = 1.2
PIPELINE_KEEPS_UP = 0.9  # JPEG-folder images/s over synthetic images/s, same settings

# The ModelZoo command (train.py's docstring) without its data, size, batch, precision and log
# interval: those are set per run below (-j: the ModelZoo's 8 for synthetic data, which needs little
# loading work; all the cores for JPEGs).
MODELZOO_FLAGS = [
    *'--model efficientnetv2_rw_t --sched step --epochs 350 --decay-epochs 2.4 --decay-rate .97'.split(),
    *'--opt rmsproptf --opt-eps .001 --warmup-lr 4e-6 --weight-decay 1e-5 --drop 0.3 --drop-connect 0.2'.split(),
    *'--aa rand-m9-mstd0.5 --lr .014 --model-ema --model-ema-decay 0.9999 --mixup 0.2'.split(),
]
# The number the ModelZoo's scripts report: the last Train line's running average images/s.
MODELZOO_IMAGES_PER_SEC = (
    "grep -a 'Train:' {log} | awk 'END {{print}}' | awk -F \"/s\" '{{print $2}}' | awk '{{print $2}}'"
)


def sizes(smoke, device):
    """What every stage runs at: the real sizes, or --smoke's toy ones (no compilation)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    if smoke:
        return dict(
            device=device,
            img_size=64,
            batch=4,
            steps=3,
            log_interval=1,
            synthetic_workers=1,
            folder_workers=cores,
            unique_jpegs=16,
            bench=['--warmup', '1', '--windows', '1', '--steps', '1', '--no-memory'],
            compile=False,
            budget_scale=3.0,
            cores=cores,
        )
    # 100 steps, as the ModelZoo's performance script (--perf-steps 100); a Train line every 10 steps:
    # every line syncs the GPU (the ModelZoo's --log-interval 1 would sync every step).
    return dict(
        device='cuda',
        img_size=288,
        batch=256,
        steps=100,
        log_interval=10,
        synthetic_workers=min(8, cores),
        folder_workers=cores,
        unique_jpegs=2048,
        bench=['--warmup', '10', '--windows', '5', '--steps', '10'],
        compile=True,
        budget_scale=1.0,
        cores=cores,
    )


# ----------------------------------------------------------------------------------------------
# Running a stage: a subprocess in its own process group, its output in a log, a hard time limit


def run_logged(name, command, timeout, env=None):
    """-> dict(status, rc, seconds, log): status 'ok', 'failed (rc N)' or 'timed out after N s'."""
    log = os.path.join(OUTPUT, f'{name}.log')
    start = time.monotonic()
    with open(log, 'w') as f:
        f.write(f'$ {shlex.join(command)}\n')
        f.flush()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED='1', **(env or {})),
        )
        try:
            rc = process.wait(timeout=max(timeout, 1))
            status = 'ok' if rc == 0 else f'failed (rc {rc})'
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher's children and loader workers too
            rc = process.wait()
            status = f'timed out after {timeout:.0f} s'
    return dict(
        status=status,
        rc=rc,
        seconds=round(time.monotonic() - start, 1),
        log=os.path.relpath(log, ROOT),
        command=shlex.join(command),
    )


def last_line(path, prefix=''):
    with open(path, errors='replace') as f:
        lines = [line.rstrip('\n') for line in f if line.startswith(prefix) and line.strip()]
    return lines[-1] if lines else ''


# ----------------------------------------------------------------------------------------------
# The stages


def environment(timeout=60):
    """The card, driver and versions, probed in a child process (this one never touches CUDA)."""
    probe = r"""
import json, os, platform
import torch, torchvision
info = dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
            cuda_build=torch.version.cuda, cuda=torch.cuda.is_available(), cpu_cores=len(os.sched_getaffinity(0)),
            cpu_count=os.cpu_count())
try:
    import timm
    info['timm'] = timm.__version__
except ImportError:
    info['timm'] = None
try:
    from apex import amp
    info['apex_amp'] = True
except Exception:
    info['apex_amp'] = False
if info['cuda']:
    properties = torch.cuda.get_device_properties(0)
    info.update(device_name=properties.name, device_count=torch.cuda.device_count(),
                device_memory_gib=round(properties.total_memory / 2**30, 1),
                capability='%d.%d' % (properties.major, properties.minor), cudnn=torch.backends.cudnn.version())
with open('/proc/cpuinfo') as f:
    info['cpu_model'] = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), None)
print(json.dumps(info))
"""
    result = subprocess.run([PYTHON, '-c', probe], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        return None
    info = json.loads(result.stdout.strip().splitlines()[-1])
    try:
        smi = subprocess.run(
            ['nvidia-smi', '--query-gpu=name,driver_version', '--format=csv,noheader'],
            capture_output=True,
            text=True,
            timeout=30,
        )
        header = subprocess.run(['nvidia-smi'], capture_output=True, text=True, timeout=30).stdout
        info['driver'] = smi.stdout.strip().splitlines()[0].split(', ')[-1] if smi.returncode == 0 else None
        found = re.search(r'CUDA Version: (\S+)', header)
        info['driver_cuda'] = found.group(1) if found else None
    except (OSError, subprocess.SubprocessError, IndexError):
        info['driver'] = None
        info['driver_cuda'] = None
    return info


def stage_tests(timeout, setup):
    """python -m pytest test -q -m cuda; the counts from its JUnit XML."""
    xml = os.path.join(OUTPUT, 'pytest.xml')
    result = run_logged(
        'tests',
        [PYTHON, '-m', 'pytest', 'test', '-q', '-m', 'cuda', '-rs', '-p', 'no:cacheprovider', f'--junitxml={xml}'],
        timeout,
    )
    if os.path.exists(xml):
        suite = ElementTree.parse(xml).getroot()
        suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
        counts = {key: int(suite.get(key, 0)) for key in ('tests', 'failures', 'errors', 'skipped')}
        counts['passed'] = counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']
        counts['failed_tests'] = [
            case.get('name')
            for case in suite.iter('testcase')
            if case.find('failure') is not None or case.find('error') is not None
        ]
        result.update(counts)
        if result['rc'] == 1:  # pytest's "some tests failed": the stage itself ran
            result['status'] = 'ok'
    return result


def train_args(setup, data, amp_dtype, compile_model, workers):
    args = [
        *data,
        *MODELZOO_FLAGS,
        '--img-size',
        setup['img_size'],
        '-b',
        setup['batch'],
        '-j',
        workers,
        '--perf-steps',
        setup['steps'],
        '--log-interval',
        setup['log_interval'],
        '--amp',
        '--amp-dtype',
        amp_dtype,
        '--device',
        setup['device'],
        '--num-classes',
        '1000',
    ]
    return [str(arg) for arg in args] + ['--compile'] * (compile_model and setup['compile'])


def stage_train(name, timeout, setup, amp_dtype, compile_model=False, data=('--dataset', 'synthetic'), workers=None):
    """train.py in a child that runs train.main() and then prints its peak memory."""
    output = os.path.join(OUTPUT, 'runs', name)
    args = train_args(setup, list(data), amp_dtype, compile_model, workers or setup['synthetic_workers'])
    result = run_logged(
        name, [PYTHON, os.path.abspath(__file__), '--train-in-process', '--', *args, '--output', output], timeout
    )
    log = os.path.join(ROOT, result['log'])
    line = last_line(log, 'Train:')
    fps = subprocess.run(
        ['bash', '-c', MODELZOO_IMAGES_PER_SEC.format(log=shlex.quote(log))], capture_output=True, text=True
    ).stdout.strip()
    result['images_per_sec'] = float(fps) if fps else None
    found = re.search(r'\((\d+\.\d+)s, +[\d.]+/s\).*Data: [\d.]+ \(([\d.]+)\)', line)
    if found:
        result['step_seconds'] = float(found.group(1))
        result['data_seconds'] = float(found.group(2))
    memory = re.search(r'^gpu_check: peak memory (\d+) MiB \((.+)\)$', last_line(log, 'gpu_check:'))
    result['peak_mib'], result['peak_kind'] = (int(memory.group(1)), memory.group(2)) if memory else (None, None)
    result['compiled'] = compile_model and setup['compile']
    if result['status'] == 'ok' and result['images_per_sec'] is None:
        result['status'] = 'failed (no Train line)'
    return result


def stage_bench(name, timeout, setup, compile_model=False):
    """bench.py --compare-timm, the training step only (the former gpu_bench.sh's command), from its JSON."""
    json_path = os.path.join(OUTPUT, f'{name}.json')
    command = [
        PYTHON,
        'bench.py',
        '--device',
        setup['device'],
        '--model',
        'efficientnetv2_rw_t',
        '--img-size',
        str(setup['img_size']),
        '-b',
        str(setup['batch']),
        *'--precision bfloat16 --channels-last on --no-pipeline --compare-timm'.split(),
        *setup['bench'],
        '--json',
        json_path,
    ]
    result = run_logged(name, command + ['--compile'] * (compile_model and setup['compile']), timeout)
    result['summary_line'] = last_line(os.path.join(ROOT, result['log']), 'summary:')
    result['compiled'] = compile_model and setup['compile']
    if result['status'] == 'ok':
        rows = read_json(json_path)['rows']
        step = next(row for row in rows if row['name'].startswith('train step'))
        memory = next((row for row in rows if 'peak memory' in row['name']), {})
        result.update(ours=step['ours'], timm=step['timm'], ratio=step['ratio'], peak_mib=memory.get('ours'))
    return result


def stage_jpegs(timeout, setup):
    """DATA/train/class_K/*.jpg: `unique_jpegs` different photos, hard-linked up to one file per image
    the run reads (steps x batch; an epoch must not end within the run), and DATA/val/ one per class.
    Made once and kept: a later run finds the same folder. The page cache holds them all (~80 MB),
    so the run measures decoding and augmentation, not a disk."""
    start = time.monotonic()
    root = os.path.join(OUTPUT, 'jpegs')
    total = max(setup['steps'] * setup['batch'], setup['unique_jpegs'])
    spec = dict(unique=setup['unique_jpegs'], total=total, classes=10)
    marker = os.path.join(root, 'made.json')
    if os.path.exists(marker) and read_json(marker) == spec:
        return dict(status='ok', seconds=round(time.monotonic() - start, 1), root=root, reused=True, **spec)
    shutil.rmtree(root, ignore_errors=True)
    import multiprocessing

    with multiprocessing.get_context('fork').Pool(setup['cores']) as pool:
        work = pool.map_async(make_jpeg, [(root, index, spec['classes']) for index in range(spec['unique'])])
        try:
            uniques = work.get(timeout=max(timeout, 1))
        except multiprocessing.TimeoutError:
            return dict(status=f'timed out after {timeout:.0f} s', seconds=round(time.monotonic() - start, 1))
    for index in range(spec['unique'], total):
        source = uniques[index % spec['unique']]
        link(source, os.path.join(os.path.dirname(source), f'{index:06d}.jpg'))
    for label in range(spec['classes']):
        source = uniques[label]
        folder = os.path.join(root, 'val', f'class_{label}')
        os.makedirs(folder, exist_ok=True)
        link(source, os.path.join(folder, os.path.basename(source)))
    with open(marker, 'w') as f:
        json.dump(spec, f)
    return dict(status='ok', seconds=round(time.monotonic() - start, 1), root=root, reused=False, **spec)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def make_jpeg(job):
    """One 500x375 (or 375x500) JPEG: a random crop of one of the two photos, flipped at random."""
    import importlib.util
    import random

    from PIL import Image

    root, index, classes = job
    sklearn_dir = importlib.util.find_spec('sklearn').submodule_search_locations[0]  # no sklearn import
    name = ('china.jpg', 'flower.jpg')[index % 2]
    photo = Image.open(os.path.join(sklearn_dir, 'datasets', 'images', name)).convert('RGB')  # 640x427
    rng = random.Random(index)
    width = rng.randint(200, 640)
    height = rng.randint(150, 427)
    left = rng.randint(0, 640 - width)
    top = rng.randint(0, 427 - height)
    image = photo.crop((left, top, left + width, top + height))
    image = image.resize((500, 375) if index % 4 else (375, 500), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    folder = os.path.join(root, 'train', f'class_{index % classes}')
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'{index:06d}.jpg')
    image.save(path, quality=rng.randint(75, 95))
    return path


def link(source, target):
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def train_in_process(argv):
    """--train-in-process -- TRAIN_ARGS: train.main(), then the peak memory (train.py prints none):
    CUDA's max_memory_allocated, or on the CPU this process's peak resident set."""
    sys.path.insert(0, ROOT)
    import resource

    import torch

    import train

    train.main(argv)  # a bad run ends here: train.py exits with its one-line error
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f'gpu_check: peak memory {torch.cuda.max_memory_allocated() // 2**20} MiB (GPU, allocated)', flush=True)
    else:
        print(
            f'gpu_check: peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB (host RSS)',
            flush=True,
        )


# ----------------------------------------------------------------------------------------------
# The plan, the summary table


def plan(setup):
    """-> ([(name, run(timeout) -> result, budget seconds, required)] in the order they run, results)."""
    results = {}

    def pipeline(name, timeout):
        jpegs = results.get('jpegs', {})
        if jpegs.get('status') != 'ok':
            return dict(status='not run: no JPEG folder', seconds=0.0)
        return stage_train(name, timeout, setup, 'bfloat16', data=(jpegs['root'],), workers=setup['folder_workers'])

    def synthetic(dtype, compiled=False):
        name = f'train_synthetic_{dtype}_{"compiled" if compiled else "eager"}'
        amp_dtype = dict(bf16='bfloat16', fp16='float16')[dtype]
        return name, partial(stage_train, name, setup=setup, amp_dtype=amp_dtype, compile_model=compiled)

    stages = [
        ('tests', partial(stage_tests, setup=setup), 120, True),
        (*synthetic('bf16'), 40, True),
        (*synthetic('fp16'), 40, True),
        ('jpegs', partial(stage_jpegs, setup=setup), 15, True),
        ('train_jpeg_bf16_eager', partial(pipeline, 'train_jpeg_bf16_eager'), 45, True),
        ('bench_eager', partial(stage_bench, 'bench_eager', setup=setup), 45, True),
        (*synthetic('bf16', compiled=True), 80, True),
        ('bench_compiled', partial(stage_bench, 'bench_compiled', setup=setup, compile_model=True), 85, True),
        (*synthetic('fp16', compiled=True), 70, False),  # only with time left over
    ]
    return stages, results


def run_stages(setup, start):
    """Each stage may run until the deadline less the budgets of the required stages after it, so
    a required stage always has at least its own budget; an optional one runs only if it has its.
    Budgets are seconds of the default 480, scaled with --budget (and 3x for --smoke)."""
    stages, results = plan(setup)
    scale = setup['budget_scale']
    deadline = start + BUDGET_SECONDS * scale
    for index, (name, run, seconds, required) in enumerate(stages):
        reserved = sum(later[2] for later in stages[index + 1 :] if later[3]) * scale
        timeout = deadline - time.monotonic() - reserved
        if not required and timeout < seconds * scale:
            results[name] = dict(status=f'not run: {max(timeout, 0):.0f} s of the budget left', seconds=0.0)
        else:
            results[name] = run(timeout)
        print(
            f'[{index + 1}/{len(stages)}] {name}: {results[name]["status"]}, {results[name]["seconds"]:.0f} s'
            + describe(results[name]),
            flush=True,
        )
    return results


def describe(result):
    """The progress line's end: the stage's main number and its log."""
    parts = []
    if result.get('images_per_sec') is not None:
        parts.append(images_text(result['images_per_sec']))
    if 'total' in result:
        parts.append(
            f'{result["unique"]} JPEGs, linked up to {result["total"]}'
            + (' (made by an earlier check)' if result['reused'] else '')
        )
    if result.get('ratio') is not None:
        parts.append(f'step ours/timm {result["ratio"]:.2f}')
    if 'passed' in result:
        parts.append(
            f'{result["passed"]} passed, {result["failures"] + result["errors"]} failed, {result["skipped"]} skipped'
        )
    return ''.join(f', {part}' for part in parts) + (f' ({result["log"]})' if 'log' in result else '')


def verdict(met, smoke):
    """'met' / 'not met'; in parentheses with --smoke, whose toy sizes the goals do not apply to."""
    if met is None:
        return '-'
    word = 'met' if met else 'not met'
    return f'({word})' if smoke else word


def images_text(value):
    return f'{value:,.0f} images/s' if value >= 100 else f'{value:.2f} images/s'


def summary_rows(results, setup, smoke):
    """[(measurement, result, peak MiB, goal, verdict)]: what was measured, never a number of ours."""
    rows = []

    def ok(name):
        return results.get(name, {}).get('status') == 'ok'

    def status(name):
        return results.get(name, {}).get('status', 'not run')

    def peak(name):
        value = results.get(name, {}).get('peak_mib')
        return '-' if value is None else f'{value:,.0f}'

    def images(name):
        return results[name].get('images_per_sec') if ok(name) else None

    compiled_label = 'compiled' if setup['compile'] else "'compiled' (--smoke: eager)"
    tests = results.get('tests', {})
    if 'passed' in tests:
        failed = tests['failures'] + tests['errors']
        ran = tests['passed'] + failed
        rows.append(
            (
                'CUDA tests (pytest -m cuda)',
                f'{tests["passed"]} passed, {failed} failed, {tests["skipped"]} skipped',
                '-',
                'all pass',
                verdict(failed == 0, smoke) if ran else 'not run (all skipped)',
            )
        )
    else:
        rows.append(('CUDA tests (pytest -m cuda)', status('tests'), '-', 'all pass', 'not met'))

    for dtype in ('bf16', 'fp16'):
        eager = f'train_synthetic_{dtype}_eager'
        compiled = f'train_synthetic_{dtype}_compiled'
        goal = '-'
        met = None
        if dtype == 'bf16':
            goal = f'>= {GOAL_BF16_EAGER_IMAGES_PER_SEC:,} (H100-class)'
            met = images(eager) >= GOAL_BF16_EAGER_IMAGES_PER_SEC if images(eager) else None
        rows.append(
            (
                f'train.py {dtype} eager',
                images_text(images(eager)) if images(eager) else status(eager),
                peak(eager),
                goal,
                verdict(met, smoke),
            )
        )
        speedup = images(compiled) / images(eager) if images(compiled) and images(eager) else None
        text = images_text(images(compiled)) if images(compiled) else status(compiled)
        text += f' ({speedup:.2f}x eager)' if speedup else ''
        rows.append(
            (
                f'train.py {dtype} {compiled_label}',
                text,
                peak(compiled),
                '> eager',
                verdict(speedup > 1 if speedup and setup['compile'] else None, smoke),
            )
        )

    jpeg = 'train_jpeg_bf16_eager'
    synthetic = 'train_synthetic_bf16_eager'
    ratio = images(jpeg) / images(synthetic) if images(jpeg) and images(synthetic) else None
    text = status(jpeg)
    if ratio:
        text = f'{images_text(images(jpeg))} ({ratio:.2f}x synthetic'
        if results[jpeg].get('data_seconds') is not None:
            text += (
                f'; loader wait {1e3 * results[jpeg]["data_seconds"]:.1f} of '
                f'{1e3 * results[jpeg]["step_seconds"]:.1f} ms a step'
            )
        text += ')'
    rows.append(
        (
            f'train.py bf16 eager, JPEG folder, -j {setup["folder_workers"]}',
            text,
            peak(jpeg),
            f'>= {PIPELINE_KEEPS_UP:.2f}x synthetic',
            verdict(ratio >= PIPELINE_KEEPS_UP if ratio else None, smoke),
        )
    )

    for name, label in (('bench_eager', 'eager'), ('bench_compiled', compiled_label)):
        result = results.get(name, {})
        text = status(name)
        met = None
        if ok(name) and result.get('ratio'):
            text = f'{result["ratio"]:.2f} ({result["ours"]:,.0f} vs {result["timm"]:,.0f} images/s)'
            met = result['ratio'] >= GOAL_STEP_OVER_TIMM
        rows.append(
            (
                f'bench.py bf16 {label}: step ours/timm',
                text,
                peak(name),
                f'>= {GOAL_STEP_OVER_TIMM}x',
                verdict(met, smoke),
            )
        )
    eager = results.get('bench_eager', {})
    compiled = results.get('bench_compiled', {})
    if eager.get('ours') and compiled.get('ours'):
        speedup = compiled['ours'] / eager['ours']
        rows.append(
            (
                f'bench.py ours: {compiled_label} / eager',
                f'{speedup:.2f}x',
                '-',
                '> 1x',
                verdict(speedup > 1 if setup['compile'] else None, smoke),
            )
        )
    return rows


def print_table(rows, env, setup, smoke, seconds):
    card = env.get('device_name') or f'no GPU, CPU {env.get("cpu_model") or ""}'.rstrip()
    print()
    print(
        f'gpu_check{" --smoke (toy sizes: the goals do not apply)" if smoke else ""} on {card}: '
        f'{seconds:.0f} s, {time.strftime("%Y-%m-%d %H:%M")}'
    )
    print(
        f'train.py: efficientnetv2_rw_t, {setup["img_size"]} px, batch {setup["batch"]}, {setup["steps"]} steps, '
        f"the reference recipe's flags, synthetic data unless said; bench.py: its training step, bf16, "
        f"channels_last, against timm's"
    )
    headers = ('measurement', 'result', 'peak MiB', 'goal', 'verdict')
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print('  '.join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(
        'peak MiB: '
        + (
            "CUDA's max_memory_allocated in the run's process"
            if setup['device'] == 'cuda'
            else "the train.py process's peak resident set (bench.py: not measured in --smoke)"
        )
    )


def header(env):
    lines = [
        f'card: {env.get("device_name", "none (no CUDA)")}'
        + (
            f' x{env["device_count"]}, {env["device_memory_gib"]} GiB, compute capability {env["capability"]}'
            if env.get('cuda')
            else ''
        ),
        f'driver: {env.get("driver") or "n/a"} (CUDA {env.get("driver_cuda") or "n/a"}); torch built with CUDA '
        f'{env.get("cuda_build") or "none"}, cuDNN {env.get("cudnn") or "n/a"}',
        f'torch {env["torch"]}, torchvision {env["torchvision"]}, timm {env.get("timm") or "not installed"}, '
        f'python {env["python"]}, apex.amp {"yes" if env.get("apex_amp") else "no"}',
        f'CPU: {env.get("cpu_cores")} cores for this process ({env.get("cpu_count")} online), '
        f'{env.get("cpu_model") or "unknown model"}',
    ]
    print('\n'.join(lines), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ['--train-in-process', '--']:
        return train_in_process(argv[2:])
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--smoke', action='store_true', help='every stage at toy sizes on whatever device is here (checks the plumbing)'
    )
    parser.add_argument(
        '--budget',
        type=float,
        default=BUDGET_SECONDS,
        help="seconds for all stages; each stage's budget scales with it (--smoke: 3x, for a slow CPU)",
    )
    cli = parser.parse_args(argv)
    start = time.monotonic()
    env = environment()
    if env is None:
        print(
            f'gpu_check needs torch, torchvision and a CUDA GPU: importing torch or torchvision fails with {PYTHON}',
            file=sys.stderr,
        )
        return 1
    if not env['cuda'] and not cli.smoke:
        print(
            'gpu_check needs a CUDA GPU: torch.cuda.is_available() is False here '
            '(--smoke runs every stage at toy sizes on any device)',
            file=sys.stderr,
        )
        return 1
    shutil.rmtree(os.path.join(OUTPUT, 'runs'), ignore_errors=True)  # the last check's; jpegs/ is kept
    os.makedirs(OUTPUT, exist_ok=True)
    for name in os.listdir(OUTPUT):
        if name.endswith(('.log', '.json', '.xml')):
            os.remove(os.path.join(OUTPUT, name))
    setup = sizes(cli.smoke, 'cuda' if env['cuda'] else 'cpu')
    header(env)
    setup['budget_scale'] *= cli.budget / BUDGET_SECONDS
    results = run_stages(setup, start)
    seconds = time.monotonic() - start
    rows = summary_rows(results, setup, cli.smoke)
    print_table(rows, env, setup, cli.smoke, seconds)
    failed = [
        name
        for name, result in results.items()
        if result['status'] != 'ok' and not result['status'].startswith('not run: ') or result.get('failed_tests')
    ]
    report = dict(
        smoke=cli.smoke,
        seconds=round(seconds, 1),
        budget_seconds=BUDGET_SECONDS * setup['budget_scale'],
        environment=env,
        setup=setup,
        stages=results,
        rows=[dict(zip(('measurement', 'result', 'peak_mib', 'goal', 'verdict'), row)) for row in rows],
        goals=dict(
            bf16_eager_images_per_sec=GOAL_BF16_EAGER_IMAGES_PER_SEC,
            step_over_timm=GOAL_STEP_OVER_TIMM,
            pipeline_keeps_up=PIPELINE_KEEPS_UP,
        ),
    )
    with open(os.path.join(OUTPUT, 'gpu_check.json'), 'w') as f:
        json.dump(report, f, indent=1)
    if results.get('tests', {}).get('failed_tests'):
        print(f'failed tests: {", ".join(results["tests"]["failed_tests"])}')
    print(
        f'logs and gpu_check.json in {os.path.relpath(OUTPUT, ROOT)}/'
        + (f'; stages that did not finish: {", ".join(failed)}' if failed else '')
    )
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
