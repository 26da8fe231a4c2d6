"""The shape of the project, as the reader meets it: components import nothing of the project,
no stage imports another stage (predict.py may import preprocess.py: prediction preprocesses),
no import circle, `import pretrain` pulls in neither NIfTI I/O nor scipy and at most 2,200 lines
of the project, every script reports a refusal through runtime.cli, and every torch.load is
weights_only."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = {p.stem: p for p in ROOT.glob("*.py")}
COMPONENTS = {"data", "model", "augment", "loss"}
STAGES = {"preprocess", "pretrain", "linear_probe", "finetune", "predict"}


def imports(path, project=FILES):
    """The project modules a file imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return {m for m in found if m in project and m != Path(path).stem}


GRAPH = {name: imports(path) for name, path in FILES.items()}


def reach(name):
    seen, todo = set(), [name]
    while todo:
        for b in GRAPH[todo.pop()]:
            if b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def test_components_import_nothing_of_the_project():
    assert {c: GRAPH[c] for c in COMPONENTS if GRAPH[c]} == {}


def test_no_stage_imports_a_stage_and_there_is_no_circle():
    bad = sorted(
        f"{a} -> {b}"
        for a in GRAPH
        for b in GRAPH[a]
        if b in STAGES and (a, b) != ("predict", "preprocess")
    )
    assert bad == []
    assert [a for a in GRAPH if a in reach(a)] == []


def test_import_pretrain_is_lean():
    closure = reach("pretrain") | {"pretrain"}
    lines = sum(len(FILES[f].read_text().splitlines()) for f in closure)
    assert lines <= 2200, (sorted(closure), lines)
    code = ("import sys; import pretrain; "
            "print(sorted(m for m in ('nibabel', 'scipy') if m in sys.modules))")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_every_script_reports_through_the_one_wrapper():
    for name in STAGES:
        tree = ast.parse(FILES[name].read_text())
        main_block = next(
            n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)
        )
        assert "runtime.cli(main, parse_args" in ast.unparse(main_block), name
        assert "sys.exit" not in FILES[name].read_text(), name


def test_every_torch_load_is_weights_only():
    loads = 0
    for path in [*FILES.values(), *ROOT.glob("experiments/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                loads += 1
                assert any(
                    k.arg == "weights_only" and ast.unparse(k.value) == "True"
                    for k in node.keywords
                ), (path.name, ast.unparse(node))
    assert loads >= 2
