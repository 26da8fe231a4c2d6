"""The README's commands cannot drift from the code: every `python X.py ...` and `torchrun ...
X.py ...` line in its code blocks must be accepted by that script's own argument parser."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [l.split("#")[0].strip() for l in block.splitlines() if not l.lstrip().startswith("#")]
    lines += re.findall(r"`(python [a-z_]+\.py[^`]*)`", text)          # commands in tables
    return [l for l in lines if re.match(r"(python|torchrun) ", l) and ".py" in l]


COMMANDS = readme_commands()


def test_readme_has_commands():
    scripts = {re.search(r"(\w+)\.py", c).group(1) for c in COMMANDS}
    assert {"preprocess", "pretrain", "linear_probe", "finetune", "evidence"} <= scripts


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.startswith("python -m")])
def test_readme_command_parses(command):
    words = shlex.split(command)
    i = next(k for k, w in enumerate(words) if w.endswith(".py"))
    module = importlib.import_module(words[i][:-3].replace("/", "."))   # neighbours/x.py -> neighbours.x
    args = module.parse_args(words[i + 1:])   # argparse exits (SystemExit) on an unknown flag
    assert args is not None
