"""The evidence that pretraining helps, on the demo set: every number in the README's results
table comes from this script, which only runs the stage scripts' own command lines.

    python evidence.py                     # the full demo evidence (~1.5 h on 2 shared CPU cores)
    python evidence.py --quick --data DIR  # a few steps of everything (the test suite runs this)

1. Pretraining (pretrain.py, demo preset): ours (balanced FPN, local augmentations, L_c + 10 L_r)
   and the vox2vec baseline (--method vox2vec), the same number of steps.
2. Linear probe (linear_probe.py, 3-fold CV): random-init backbone vs ours vs vox2vec (Table 1-2).
3. Fine-tuning vs training from scratch (finetune.py) with 2, 4 and all training cases per fold
   (Table 3), 2-fold CV to stay inside the time budget.
Results: OUT/evidence.md (a Markdown table with the commands) and OUT/evidence.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script, *args, log, done=None):
    """Run one stage's own command line; skipped when its output `done` exists (a re-run continues)."""
    cmd = [sys.executable, str(HERE / script), *map(str, args)]
    shown = "python " + " ".join([script, *map(str, args)])
    if done is not None and Path(done).exists():
        print(f"\n(already done: {shown})", flush=True)
        log.append(dict(command=shown, seconds=None))
        return
    print(f"\n$ {shown}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=HERE)
    log.append(dict(command=shown, seconds=round(time.time() - t, 1)))


def result(path):
    r = json.loads((Path(path) / "results.json").read_text())
    return r["mean_dice"], r["std_dice"], len(r["folds"])


def fmt(r):
    return f"{r[0]:.3f} ± {r[1]:.3f} ({r[2]} folds)"


def main(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    q = args.quick
    data = ["--data", args.data]
    steps = ["--steps", "2"] if q else []      # else each script's demo preset
    small = ["--workers", "0", "--preset", "demo"] if q else []
    one_fold = ["--fold", "0"] if q else []
    log, t0 = [], time.time()
    rows = {}

    # 1. pretraining, same budget for both methods
    pre = {"ours": out / "pretrain-balanced", "vox2vec": out / "pretrain-vox2vec"}
    run("pretrain.py", *data, "--out", pre["ours"], *steps, *small, log=log, done=pre["ours"] / "backbone.pt")
    run("pretrain.py", *data, "--method", "vox2vec", "--out", pre["vox2vec"], *steps, *small, log=log,
        done=pre["vox2vec"] / "backbone.pt")

    # 2. linear probe
    folds = ["--folds", "2" if q else "3"]
    probe = {"random init": ["--init", "random"], "vox2vec (pretrained)": ["--checkpoint", pre["vox2vec"] / "backbone.pt"],
             "ours (pretrained)": ["--checkpoint", pre["ours"] / "backbone.pt"]}
    for name, init in probe.items():
        d = out / ("probe-" + name.split()[0].replace("(", ""))
        run("linear_probe.py", *data, *init, "--out", d, *folds, *one_fold, *steps, *small, log=log,
            done=d / "results.json")
        rows[("linear probe", name)] = result(d)

    # 3. fine-tune vs scratch at three label budgets
    for budget in ["2"] if q else ["2", "4", "all"]:
        limit = [] if budget == "all" else ["--train-cases", budget]
        for name, init in {"from scratch": ["--init", "random"],
                           "fine-tuned (ours)": ["--checkpoint", pre["ours"] / "backbone.pt"]}.items():
            d = out / f"finetune-{budget}-{name.split()[0]}"
            run("finetune.py", *data, *init, "--out", d, "--folds", "2", *one_fold, *limit, *steps, *small,
                *(["--freeze-steps", "1", "--ramp-steps", "1"] if q else []), log=log, done=d / "results.json")
            rows[(f"fine-tune, {budget} training cases", name)] = result(d)

    minutes = (time.time() - t0) / 60
    lines = ["| experiment | model | mean Dice ± std over folds |", "|---|---|---|"]
    lines += [f"| {exp} | {name} | {fmt(r)} |" for (exp, name), r in rows.items()]
    lines += ["", f"Total {minutes:.1f} min on {os.cpu_count()} CPU cores. Commands:", ""]
    lines += [f"    {e['command']}" + (f"    # {e['seconds']:.0f} s" if e["seconds"] else "") for e in log]
    (out / "evidence.md").write_text("\n".join(lines) + "\n")
    (out / "evidence.json").write_text(json.dumps(dict(
        results=[dict(experiment=e, model=n, mean_dice=r[0], std_dice=r[1], folds=r[2]) for (e, n), r in rows.items()],
        commands=log, minutes=minutes), indent=2))
    print("\n" + "\n".join(lines))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="demo")
    p.add_argument("--out", default="runs/evidence")
    p.add_argument("--quick", action="store_true", help="2 steps of everything: checks the pipeline, not the numbers")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
