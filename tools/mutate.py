"""Mutation testing: do the fast tests catch realistic one-line bugs?

    python tools/mutate.py                         # every mutation of tools/mutations.json
    python tools/mutate.py --only=RLE --only=metric  # those whose name contains one of the words
    python tools/mutate.py --list=my.json --json=report.json

Each mutation replaces one exact piece of text (it must occur exactly once) in one file by a buggy variant and
runs the tests named with it; the mutation is caught when they fail. The work happens in a copy of the
repository's tracked files in a temporary folder, so the checkout is never modified, even if this command is
killed. Before the mutations, the same tests run once on the unmodified copy and must pass (otherwise a
"caught" would mean nothing). Prints one line per mutation and the score; exit status 0 when every valid
mutation is caught, 1 otherwise, 2 when the list is unusable (text not found, tests failing unmodified).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_repository(destination: str) -> None:
    """Copies the files git tracks (as they are in the working tree) into `destination`."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = os.path.join(REPO_ROOT, name)
        if not os.path.isfile(source):
            continue  # deleted in the working tree
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


def run_tests(root: str, tests: list[str], timeout: float) -> tuple[bool, str]:
    """(passed, last output lines) of `pytest -x` on `tests` in the copy at `root`, importing its salt_tf."""
    env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1")
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
    return result.returncode == 0, tail[0]


def check_applicable(root: str, mutation: dict) -> str | None:
    """Why `mutation` cannot be applied to the copy at `root` (None when its text occurs exactly once)."""
    path = os.path.join(root, mutation["file"])
    if not os.path.isfile(path):
        return f"no file {mutation['file']}"
    count = open(path, encoding="utf-8").read().count(mutation["old"])
    return None if count == 1 else f"text found {count} times in {mutation['file']} (must be exactly once)"


def try_mutation(root: str, mutation: dict, timeout: float) -> tuple[bool, str]:
    """Applies `mutation` in the copy, runs its tests, restores the file: (caught, pytest's last line)."""
    path = os.path.join(root, mutation["file"])
    original = open(path, encoding="utf-8").read()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(mutation["old"], mutation["new"], 1))
        passed, tail = run_tests(root, mutation["tests"], timeout)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    return not passed, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", default=os.path.join(REPO_ROOT, "tools", "mutations.json"),
                        help="JSON file: {\"mutations\": [{name, file, old, new, tests}, ...]}")
    parser.add_argument("--only", action="append", default=[], help="keep mutations whose name contains this")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    mutations = json.load(open(args.list, encoding="utf-8"))["mutations"]
    if args.only:
        mutations = [m for m in mutations if any(word in m["name"] for word in args.only)]
    with tempfile.TemporaryDirectory(prefix="salt_tf_mutate_") as root:
        copy_repository(root)
        problems = [f"{m['name']}: {why}" for m in mutations if (why := check_applicable(root, m))]
        for tests in sorted({tuple(m["tests"]) for m in mutations}):
            passed, tail = run_tests(root, list(tests), args.timeout)
            if not passed:
                problems.append(f"{' '.join(tests)} fail without any mutation: {tail}")
        if problems:
            print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
            return 2
        results = []
        for mutation in mutations:
            started = time.monotonic()
            caught, tail = try_mutation(root, mutation, args.timeout)
            results.append({"name": mutation["name"], "caught": caught, "seconds": time.monotonic() - started,
                            "pytest": tail})
            print(f"{'caught    ' if caught else 'NOT CAUGHT'}  {mutation['name']}  ({tail})", flush=True)
    caught = sum(r["caught"] for r in results)
    print(f"{caught} of {len(results)} mutations caught ({100 * caught / max(len(results), 1):.0f} %)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"caught": caught, "total": len(results), "results": results}, f, indent=1)
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
