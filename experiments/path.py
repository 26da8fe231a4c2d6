"""The path of one run: every product function (a top-level .py file's) that a command executes,
each counted from its `def` line to its end, per file, and the method's share of those lines.

    python experiments/path.py pretrain.py --data demo --steps 1 --workers 0 --out /tmp/p1
    python experiments/path.py --list pretrain.py --data demo --steps 1 --workers 0 --out /tmp/p2

A profile hook records the code objects the command runs in this process (a DataLoader with
--workers 0 runs its dataset here too); comprehensions and class bodies are not functions, a
lambda is. The method (issue "One run in one read"): augment.py, model.py, loss.py, the pair
sampling of data.py (METHOD) and pretrain.py's model, step, loop and learning rate.
"""

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = {"augment.py", "model.py", "loss.py"}
METHOD = {
    "data.py": {
        "read_patch",
        "start_range",
        "sample_anchor",
        "sample_pair",
        "collate_pairs",
        "PairDataset.__init__",
        "PairDataset.__getitem__",
    },
    "pretrain.py": {"build_model", "training_step", "train", "learning_rate"},
}
SKIP = {"<module>", "<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}
HOOK = """
import json, runpy, sys, threading
root, out, seen = sys.argv[1], sys.argv[2], set()
def hook(frame, event, arg):
    code = frame.f_code
    name = code.co_filename
    if event == "call" and name.startswith(root) and "/" not in name[len(root):]:
        seen.add((name, code.co_firstlineno, code.co_name))
sys.argv = sys.argv[3:]
sys.path.insert(0, root)
sys.setprofile(hook)
threading.setprofile(hook)
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print(f"exit {e.code}")
finally:
    sys.setprofile(None)
    json.dump(sorted(seen), open(out, "w"))
"""


def executed(command, out):
    """The (file, first line, name) of every product code object `command` runs."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    script = str(ROOT / command[0])
    result = subprocess.run(
        [sys.executable, "-c", HOOK, str(ROOT) + "/", str(out), script, *command[1:]],
        cwd=ROOT,
        env=env,
    )
    return json.loads(Path(out).read_text()), result.returncode


def functions(path):
    """{first line of its code object: (qualified name, def line, end line)} of a file's
    functions and lambdas."""
    found = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                name = prefix + child.name
                found[first] = (name, child.lineno, child.end_lineno)
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):  # its body runs once, at import: not a function
                first = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                found[first] = (None, child.lineno, child.end_lineno)
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.Lambda):
                found.setdefault(
                    child.lineno, (prefix + "<lambda>", child.lineno, child.end_lineno)
                )
                visit(child, prefix)
            else:
                visit(child, prefix)

    visit(ast.parse(Path(path).read_text()), "")
    return found


def chars(lines):
    return sum(len(line.strip()) for line in lines)


def main(args):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        seen, code = executed(args.command, Path(tmp) / "seen.json")
    rows, tables = [], {}
    for filename, first, name in seen:
        if name in SKIP:
            continue
        path = Path(filename)
        tables.setdefault(path, functions(path))
        qualified, start, end = tables[path].get(first, (name, first, first))
        if qualified is None:
            continue
        text = path.read_text().splitlines()[start - 1 : end]
        method = path.name in METHOD_FILES or qualified in METHOD.get(path.name, ())
        rows.append((path.name, qualified, end - start + 1, chars(text), method))
    per_file = {}
    for file, _, lines, characters, method in rows:
        f = per_file.setdefault(file, [0, 0, 0, 0])
        f[0] += 1
        f[1] += lines
        f[2] += characters
        f[3] += lines if method else 0
    print(f"command: {' '.join(args.command)} (exit {code})")
    print("| file | functions | lines | characters | method lines |\n|---|---|---|---|---|")
    for file, (n, lines, characters, method) in sorted(per_file.items(), key=lambda kv: -kv[1][1]):
        print(f"| {file} | {n} | {lines} | {characters:,} | {method} |")
    total = [sum(v[i] for v in per_file.values()) for i in range(4)]
    print(
        f"| all | **{total[0]}** | **{total[1]}** | {total[2]:,} | {total[3]} "
        f"({100 * total[3] / max(total[1], 1):.1f}%) |"
    )
    if args.list:
        for row in sorted(rows):
            print(f"{row[0]:16s} {row[1]:44s} {row[2]:4d} {'method' if row[4] else ''}")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="also every function, with its lines")
    p.add_argument("command", nargs=argparse.REMAINDER, help="SCRIPT.py and its flags")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
