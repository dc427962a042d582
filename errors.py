"""The errors that end a run in one line (`error: ...`, exit status 2, no traceback), and the reading of
one line out of an error. Imports nothing of the project: every file may raise these.
"""

import importlib
import sys

import torch


class UsageError(ValueError):
    """Bad input from the command line or the machine: one line, exit status 2, no traceback."""


class DataError(ValueError):
    """Bad user input about data. The message is one line: what is wrong and how to fix it."""


class CheckpointError(ValueError):
    """A weights or checkpoint file that cannot be used: missing, unreadable, unsafe, or not this model's."""


def check_torchvision():
    """Ends the program with one line when torchvision was built for another torch than this one (its
    operators fail to register: 'operator torchvision::nms does not exist'); call it before importing it."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        print(
            f'error: torchvision does not work with torch {torch.__version__} ({one_line(error)}); install a '
            f'matching pair from one index, e.g. pip install --force-reinstall torch torchvision',
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)


def one_line(error):
    """The message alone, also when a DataLoader worker wrapped it in its traceback text."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    last = lines[-1]
    for prefix in (f'{type(error).__module__}.{type(error).__name__}: ', f'{type(error).__name__}: '):
        last = last[len(prefix) :] if last.startswith(prefix) else last
    return last


def import_beside(name, feature):
    """NAME.py, beside the copy as only `feature` needs it (README, "What to copy"); missing, it is one error line."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        raise UsageError(f'{feature} needs {name}.py beside train.py: copy it from the project') from None
