"""Runs side by side: the Dice per class of linear_probe.py / finetune.py results, one column each.

    python experiments/compare.py runs/probe runs/probe-random runs/ft runs/scratch

Each argument is a run folder (or its results.json). Given in pairs (a pretrained run, then its
baseline), the last lines are each pair's difference in mean Dice.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: the stage files
import runtime  # noqa: E402
from data import InputError  # noqa: E402


def read(path):
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(
            f"{path}: not a results.json of linear_probe.py or finetune.py ({type(e).__name__})"
        ) from None
    if not isinstance(results, dict) or not {"per_class", "mean_dice"} <= set(results):
        raise InputError(
            f"{path}: not a results.json of linear_probe.py or finetune.py (no per_class / "
            "mean_dice)"
        )
    return results


def main(args):
    runs = {str(r): read(r) for r in args.runs}
    names = list(runs)
    width = max(12, *(len(n) for n in names))
    print(f"{'mean Dice':<16}" + "".join(f" {n:>{width}}" for n in names))
    classes = list(next(iter(runs.values()))["per_class"])
    for c in classes:
        cells = [r["per_class"].get(c) for r in runs.values()]
        print(
            f"{c:<16}" + "".join(f" {'n/a' if v is None else f'{v:.3f}':>{width}}" for v in cells)
        )
    print(f"{'mean':<16}" + "".join(f" {r['mean_dice']:>{width}.3f}" for r in runs.values()))
    for a, b in zip(names[::2], names[1::2]):
        print(f"{a} - {b}: {runs[a]['mean_dice'] - runs[b]['mean_dice']:+.3f}")
    return runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "runs",
        nargs="+",
        help="run folders (or results.json files), in pairs: pretrained, baseline",
    )
    return runtime.parse(p, argv)


if __name__ == "__main__":
    runtime.cli(main, parse_args)
