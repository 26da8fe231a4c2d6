"""The README's commands cannot drift from the code: every `python X.py ...` and `torchrun ...
X.py ...` line in its code blocks (and in those of the docs/ pages and the lab's README, except
the history page, whose commands are those of their day) must be accepted by that script's own
argument parser; the reading guide, within the README's first 80 lines, and its call sequence of
one pretraining step name functions that exist."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    ROOT / "experiments" / "README.md",
    *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "history.md"),
]


def readme_commands(pages=PAGES):
    lines = []
    for page in pages:
        text = page.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            lines += [
                l.split("#")[0].strip()
                for l in block.splitlines()
                if not l.lstrip().startswith("#")
            ]
        lines += re.findall(r"`(python [\w/]+\.py[^`]*)`", text)  # commands in tables and prose
    return [l for l in lines if re.match(r"(python|torchrun) ", l) and ".py" in l]


COMMANDS = readme_commands()


def test_readme_has_commands():
    scripts = {re.search(r"(\w+)\.py", c).group(1) for c in readme_commands([ROOT / "README.md"])}
    assert {"preprocess", "pretrain", "linear_probe", "finetune", "predict", "evidence"} <= scripts


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.startswith("python -m")])
def test_readme_command_parses(command):
    words = shlex.split(command)
    i = next(k for k, w in enumerate(words) if w.endswith(".py"))
    module = importlib.import_module(
        words[i][:-3].replace("/", ".")
    )  # neighbours/x.py -> neighbours.x
    args = module.parse_args(
        words[i + 1 :]
    )  # argparse exits (SystemExit) on an unknown flag or a broken rule
    assert args is not None


def guide():
    text = (ROOT / "README.md").read_text()
    start = text.index("## Reading guide")
    return text[start : text.index("\n## ", start + 1)], text[:start].count("\n") + 1


def test_the_reading_guide_comes_first_and_names_what_exists():
    """Every `file.py:name` of the reading guide (paper section / equation -> code) and of its call
    sequence of one pretraining step is a function, class or constant of that file, so the guide
    cannot point at code that moved; the guide starts within the README's first 80 lines."""
    section, line = guide()
    assert line <= 80, f"the reading guide starts at line {line}"
    refs = re.findall(r"([\w/]+\.py):([\w.]+)", section)
    assert len(refs) >= 25
    for path, name in refs:
        target = importlib.import_module(path[:-3].replace("/", "."))
        for part in name.split("."):
            target = getattr(target, part)  # AttributeError if it is not there
        assert target is not None


def test_the_call_sequence_follows_the_code():
    """The call sequence starts at pretrain.py:main and reaches training_step; each line's function
    is named in the source of the line it is indented under (a module's forward is called as the
    module, so it is not looked for)."""
    import inspect

    section, _ = guide()
    block = re.search(r"```text\n(.*?)```", section, flags=re.S).group(1)
    lines = [l for l in block.splitlines() if re.search(r"\.py:", l)]
    calls = [re.search(r"([\w/]+)\.py:([\w.]+)", l).groups() for l in lines]
    depth = [len(l) - len(l.lstrip()) for l in lines]
    assert calls[0] == ("pretrain", "main") and ("pretrain", "training_step") in calls
    for k, (module, name) in enumerate(calls[1:], start=1):
        parent = next(j for j in range(k - 1, -1, -1) if depth[j] < depth[k])
        target = importlib.import_module(calls[parent][0])
        for part in calls[parent][1].split("."):
            target = getattr(target, part)
        if not name.endswith(".forward"):
            assert name.split(".")[-1] in inspect.getsource(target), (calls[parent], name)
