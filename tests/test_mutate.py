"""tools/mutate.py: a mutation the tests notice is 'caught', one they miss is not, the file is restored."""

import importlib.util
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("mutate", os.path.join(REPO_ROOT, "tools", "mutate.py"))
mutate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutate)


def test_caught_missed_and_restored(tmp_path):
    (tmp_path / "calc.py").write_text("def add(a, b):\n    return a + b\n\n\ndef unused():\n    return 1\n")
    (tmp_path / "test_calc.py").write_text("import calc\n\n\ndef test_add():\n    assert calc.add(2, 3) == 5\n")
    original = (tmp_path / "calc.py").read_text()
    tests = ["test_calc.py"]
    assert mutate.run_tests(str(tmp_path), tests, 120)[0]
    caught, tail = mutate.try_mutation(str(tmp_path), {"file": "calc.py", "old": "a + b", "new": "a - b",
                                                       "tests": tests}, 120)
    assert caught and "1 failed" in tail
    missed, tail = mutate.try_mutation(str(tmp_path), {"file": "calc.py", "old": "return 1", "new": "return 2",
                                                       "tests": tests}, 120)
    assert not missed and "1 passed" in tail
    assert (tmp_path / "calc.py").read_text() == original
    assert mutate.check_applicable(str(tmp_path), {"file": "calc.py", "old": "return"}) == \
        "text found 2 times in calc.py (must be exactly once)"
    assert mutate.check_applicable(str(tmp_path), {"file": "calc.py", "old": "a + b"}) is None


def test_the_shipped_list_applies_to_the_code():
    import json
    listed = json.load(open(os.path.join(REPO_ROOT, "tools", "mutations.json"), encoding="utf-8"))["mutations"]
    assert len(listed) >= 30
    problems = [(m["name"], why) for m in listed if (why := mutate.check_applicable(REPO_ROOT, m))]
    assert not problems, problems
    for test in {t for m in listed for t in m["tests"]}:  # a file, or a file::test node id
        path, _, node = test.partition("::")
        assert os.path.isfile(os.path.join(REPO_ROOT, path)), test
        assert not node or f"def {node.split('[')[0]}(" in open(os.path.join(REPO_ROOT, path)).read(), test
