"""The README's commands cannot drift from the code: every `python X.py ...` and `torchrun ...
X.py ...` line in its code blocks (and in those of the docs/ pages and the lab's README, except
the history page, whose commands are those of their day) must be accepted by that script's own
argument parser; the reading guide names functions that exist."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


PAGES = [ROOT / "README.md", ROOT / "experiments" / "README.md",
         *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "history.md")]


def readme_commands(pages=PAGES):
    lines = []
    for page in pages:
        text = page.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            lines += [l.split("#")[0].strip() for l in block.splitlines() if not l.lstrip().startswith("#")]
        lines += re.findall(r"`(python [\w/]+\.py[^`]*)`", text)          # commands in tables and prose
    return [l for l in lines if re.match(r"(python|torchrun) ", l) and ".py" in l]


COMMANDS = readme_commands()


def test_readme_has_commands():
    scripts = {re.search(r"(\w+)\.py", c).group(1) for c in readme_commands([ROOT / "README.md"])}
    assert {"preprocess", "pretrain", "linear_probe", "finetune", "evidence"} <= scripts


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.startswith("python -m")])
def test_readme_command_parses(command):
    words = shlex.split(command)
    i = next(k for k, w in enumerate(words) if w.endswith(".py"))
    module = importlib.import_module(words[i][:-3].replace("/", "."))   # neighbours/x.py -> neighbours.x
    args = module.parse_args(words[i + 1:])   # argparse exits (SystemExit) on an unknown flag
    assert args is not None


def test_reading_guide_names_functions_that_exist():
    """Every `file.py:name` of the README's reading guide (paper section / equation -> code) is a
    function, class or constant of that file, so the guide cannot point at code that moved."""
    text = (ROOT / "README.md").read_text()
    guide = text[text.index("## Reading guide"):]
    guide = guide[:guide.index("\n## ", 1)]
    refs = re.findall(r"`([\w/]+\.py):([\w.]+)`", guide)
    assert len(refs) >= 15
    for path, name in refs:
        target = importlib.import_module(path[:-3].replace("/", "."))
        for part in name.split("."):
            target = getattr(target, part)            # AttributeError if it is not there
        assert target is not None
