"""Regenerate the README's "Changing the recipe" diffs against the train.py of today, after train.py moved.

    python tools/readme_diffs.py          # rewrites README.md in place; says which diff no longer applies

Each diff replaces one run of train.py's lines (its '-' lines) by others (its '+' lines). Where the '-' lines are
still in train.py the diff is made again with its context and line numbers of today (difflib, one line of
context, as `diff -U1`); where they are not, the function changed: edit that diff by hand, then run this again.
test/test_changing_the_recipe.py applies the diffs and trains.
"""

import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def remake(diff, source):
    lines = diff.splitlines(keepends=True)[3:]  # after ---, +++ and the first @@ (one hunk per diff)
    removed = ''.join(line[1:] for line in lines if line.startswith('-'))
    added = ''.join(line[1:] for line in lines if line.startswith('+'))
    if source.count(removed) != 1:
        raise SystemExit(f"error: this diff's '-' lines are not (once) in train.py; edit it by hand:\n{diff}")
    changed = source.replace(removed, added)
    return ''.join(
        difflib.unified_diff(
            source.splitlines(keepends=True), changed.splitlines(keepends=True), 'a/train.py', 'b/train.py', n=1
        )
    )


def main():
    readme_path = os.path.join(ROOT, 'README.md')
    with open(readme_path) as f:
        readme = f.read()
    with open(os.path.join(ROOT, 'train.py')) as f:
        source = f.read()
    readme = re.sub(r'```diff\n(.*?)```', lambda m: f'```diff\n{remake(m.group(1), source)}```', readme, flags=re.S)
    with open(readme_path, 'w') as f:
        f.write(readme)
    print(f'rewrote the diffs in {readme_path}')


if __name__ == '__main__':
    sys.exit(main())
