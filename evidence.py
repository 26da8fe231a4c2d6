"""The evidence that pretraining helps, on the demo set: every number and figure in the README's
"Results" comes from this script, which only runs the stage scripts' own command lines.

    python evidence.py                     # the demo evidence (~1 h on 2 idle CPU cores)
    python evidence.py --ablation          # Table 1's rows on the demo (after the above; ~30 min)
    python evidence.py --neighbours        # Models Genesis, MIM, DenseCL, MedContext beside ours
    python evidence.py --quick --data DIR  # a few steps of everything (the test suite runs this)

Protocol (Sec. 3.2 of the paper, at demo scale; 3-fold cross-validation over the 20 demo cases):
1. Pretraining (pretrain.py, demo preset): ours (balanced FPN, local augmentations, L_c + 10 L_r)
   and the vox2vec baseline (--method vox2vec), the same number of steps.
2. Linear probe (linear_probe.py): random-init backbone vs vox2vec vs ours (Tables 1-2).
3. Fine-tuning ours vs training from scratch (finetune.py) with 1, 2 and all training cases per
   fold (Fig. 1, Table 3), the same steps for every budget; both arms with finetune.py's default
   augmentation, and at 1 case also both with --aug none (the paper's protocol).
4. Figures (matplotlib, imported here only): Dice vs labelled cases; one held-out slice (image,
   ground truth, scratch, fine-tuned); the first three principal components of the voxel
   features as RGB for random init, vox2vec and ours; the pretraining curves.
Results: OUT/evidence.md (tables with the paper's numbers beside ours, the commands and their
wall times), OUT/evidence.json and OUT/*.png. A re-run skips every command whose output exists.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
AUGS = {"nnunet-like": "", "none": "-noaug"}   # finetune.py --aug -> suffix of the run folder
# The paper's numbers, for scale (real CT / MRI, 50,000 pretraining steps on an A100).
PAPER = {"linear probe": "MRI (Table 1): vox2vec 58.8, ours 65.7; CT/BTCV (Table 2): vox2vec 62.0, ours 65.6",
         "fine-tune": "MRI (Table 3): 4 cases 48.4 -> 57.7, 8 cases 63.3 -> 69.3, 42 cases 77.1 -> 78.8 (scratch -> fine-tuned)"}


def run(script, *args, log, done=None):
    """Run one stage's own command line; skipped when its output `done` exists (a re-run continues)."""
    cmd = [sys.executable, str(HERE / script), *map(str, args)]
    shown = "python " + " ".join([script, *map(str, args)])
    if finished(done, script, [str(a) for a in args]):
        print(f"\n(already done: {shown})", flush=True)
        log.append(dict(command=shown, seconds=None))
        return
    print(f"\n$ {shown}", flush=True)
    t = time.time()
    code = subprocess.run(cmd, cwd=HERE).returncode
    if code:
        sys.exit(f"evidence.py: error: `{shown}` failed with exit code {code} (its own message is above); "
                 "fix it and run evidence.py again: finished commands are skipped")
    log.append(dict(command=shown, seconds=round(time.time() - t, 1)))


def finished(done, script, args):
    """The command's output exists and was made with the same augmentation: a fine-tune from before
    finetune.py had --aug (trained without augmentation) is another experiment, run again."""
    if done is None or not Path(done).exists():
        return False
    if script in ("finetune.py", "neighbours/medcontext.py") and Path(done).name == "results.json":
        aug = args[args.index("--aug") + 1] if "--aug" in args else "nnunet-like"
        return json.loads(Path(done).read_text())["config"].get("aug", "none") == aug
    return True


def result(path):
    return json.loads((Path(path) / "results.json").read_text())


def fmt(r):
    return f"{r['mean_dice']:.3f} ± {r['std_dice']:.3f}"


def pretrain_summary(run_dir):
    """Last logged L_c and L_r, the chance level ln(2N - 1) of InfoNCE with N voxel pairs per view."""
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    import torch   # here, not at the top: the rest of this script only runs the stage scripts
    cfg = torch.load(Path(run_dir) / "backbone.pt", weights_only=True)["pretrain_config"]
    chance = math.log(2 * cfg["num_voxels"] * cfg["batch_pairs"] - 1)
    return dict(rows=rows, chance=chance, l_c=rows[-1]["loss_contrastive"], l_r=rows[-1]["loss_recon"],
                steps=rows[-1]["step"], seconds=rows[-1]["seconds"])


def claim_output(args):
    """OUT continues an earlier run of the same protocol (finished commands are skipped); one made
    with other data or another --quick would mix into its tables: refused unless --force."""
    if args.data != "demo" and not (Path(args.data) / "dataset.json").is_file():
        sys.exit(f"evidence.py: error: --data {args.data}: no dataset.json (a preprocess.py output folder, or 'demo')")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record, made = out / "evidence-args.json", dict(data=str(args.data), quick=bool(args.quick))
    if record.is_file() and json.loads(record.read_text()) != made and not args.force:
        sys.exit(f"evidence.py: error: {out} holds results made with {record.read_text().strip()}, not {made}; "
                 "choose another --out or pass --force")
    record.write_text(json.dumps(made))
    return out


def main(args):
    out = claim_output(args)
    q = args.quick
    data = ["--data", args.data]
    small = ["--workers", "0", "--preset", "demo"] if q else ["--workers", "0"]   # [2:]: without --workers
    log, t0, rows = [], time.time(), {}
    pre = {"ours": out / "pretrain-balanced", "vox2vec": out / "pretrain-vox2vec"}
    probes = {"random init": out / "probe-random", "vox2vec": out / "probe-vox2vec", "ours": out / "probe-ours"}

    # 1. pretraining, same budget for both methods
    steps = ["--steps", "2"] if q else []
    run("pretrain.py", *data, "--out", pre["ours"], *steps, *small, log=log, done=pre["ours"] / "backbone.pt")
    run("pretrain.py", *data, "--method", "vox2vec", "--out", pre["vox2vec"], *steps, *small, log=log,
        done=pre["vox2vec"] / "backbone.pt")

    # 2. linear probe on cached features
    folds = ["--folds", "2", "--fold", "0", "--max-steps", "3"] if q else ["--folds", "3"]
    inits = {"random init": ["--init", "random"], "vox2vec": ["--checkpoint", pre["vox2vec"] / "backbone.pt"],
             "ours": ["--checkpoint", pre["ours"] / "backbone.pt"]}
    for name, init in inits.items():
        run("linear_probe.py", *data, *init, "--out", probes[name], *folds, *small[2:], log=log,
            done=probes[name] / "results.json")
        rows[("linear probe", name)] = result(probes[name])

    # 3. fine-tune vs scratch at three label budgets
    budgets = ["1"] if q else ["1", "2", "all"]
    ft_folds = ["--folds", "2", "--fold", "0", "--steps", "2", "--freeze-steps", "1", "--ramp-steps", "1"] if q \
        else ["--folds", "3"]
    # Both arms always get the same augmentation (finetune.py --aug); at the smallest budget also
    # without it (the paper's protocol), so what augmentation buys stands beside what pretraining buys.
    for budget in budgets:
        limit = [] if budget == "all" else ["--train-cases", budget]
        for aug in (AUGS if budget == budgets[0] else AUGS[:1]):
            for name, init in {"from scratch": ["--init", "random"],
                               "fine-tuned (ours)": ["--checkpoint", pre["ours"] / "backbone.pt"]}.items():
                d = out / f"finetune-{budget}-{name.split()[0]}{AUGS[aug]}"
                run("finetune.py", *data, *init, "--aug", aug, "--out", d, *ft_folds, *limit, *small, log=log,
                    done=d / "results.json")
                rows[(f"fine-tune, {budget} training case(s){', --aug none' if aug == 'none' else ''}", name)] = result(d)

    pretraining = {k: pretrain_summary(v) for k, v in pre.items()}
    figures = [] if args.no_figures else make_figures(out, args.data, pre, pretraining, budgets, rows)
    write_report(out, rows, pretraining, figures, log, (time.time() - t0) / 60)
    return rows


def ablation(args):
    """Table 1's rows on the demo: which of the three changes costs or buys what (probe Dice)."""
    out = claim_output(args)
    log, rows = [], {}
    variants = {
        "vox2vec baseline": (out / "pretrain-vox2vec", None),
        "+ local augmentations": (out / "ablation-localaug", ["--arch", "vox2vec", "--aug", "local", "--recon-weight", "0"]),
        "L_r only (restorative)": (out / "ablation-recon", ["--arch", "vox2vec", "--aug", "local", "--contrastive-weight", "0"]),
        "+ L_c + L_r (hybrid)": (out / "ablation-hybrid", ["--arch", "vox2vec", "--aug", "local"]),
        "+ balanced architecture (ours)": (out / "pretrain-balanced", None),
    }
    for name, (run_dir, flags) in variants.items():
        if flags is not None:
            run("pretrain.py", "--data", args.data, "--out", run_dir, "--workers", "0", *flags, log=log,
                done=run_dir / "backbone.pt")
        probe = out / ("probe-" + run_dir.name.replace("pretrain-", "").replace("balanced", "ours"))
        run("linear_probe.py", "--data", args.data, "--checkpoint", run_dir / "backbone.pt", "--out", probe,
            "--folds", "3", "--workers", "0", log=log, done=probe / "results.json")
        rows[name] = result(probe)
    lines = ["| Table 1 row (demo) | linear probe, mean Dice ± std over 3 folds | paper (MRI) |", "|---|---|---|"]
    paper = ["58.8", "62.1", "44.4", "-", "65.7"]
    lines += [f"| {n} | {fmt(r)} | {p} |" for (n, r), p in zip(rows.items(), paper)]
    lines += ["", "Commands:", ""] + [f"    {e['command']}" + (f"    # {e['seconds']:.0f} s" if e["seconds"] else "")
                                      for e in log]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


# ----------------------------------------------------------------------------- neighbouring methods

NEIGHBOURS = ("genesis", "mim", "densecl")
# What each method's own paper reports, for scale (different data, networks and budgets).
NEIGHBOUR_PAPERS = {
    "genesis": "Models Genesis (Zhou et al. 2021): the restorative row L_r only of our paper's Table 1 (MRI): 44.4",
    "mim": "3D MIM (Chen et al. 2023): faster convergence and higher Dice than from scratch (multi-organ CT, BraTS)",
    "densecl": "DenseCL on 2-D ultrasound (seed poster): up to +3.9 mIoU over no pretraining at 1% labels",
    "medcontext": "MedContext (Gani et al. 2024): gains over plain supervised training, largest in few-shot settings",
}


def neighbours(args):
    """The neighbouring methods beside ours and the baselines, on the evidence protocol:
    each pretraining method (same demo preset, steps, data and FPN as ours) gets a linear probe
    and a fine-tune at the smallest label budget; MedContext (no pretraining) is fine-tuned from
    scratch at every budget, and on top of our pretrained backbone at the smallest. The
    pretraining of ours is the main run's (OUT/pretrain-balanced, run here if missing).
    --fold k [k ...] runs only those of the 3 folds (a 2-core machine can do it in pieces: a run
    skips every command already done, and the report averages the folds it was given)."""
    out = claim_output(args)
    q = args.quick
    data = ["--data", args.data]
    small = ["--workers", "0", "--preset", "demo"] if q else ["--workers", "0"]   # [2:]: without --workers
    folds = args.fold if args.fold is not None else ([0] if q else [0, 1, 2])   # --quick: 2 folds, run one
    log, t0 = [], time.time()
    pre = {"ours": out / "pretrain-balanced", **{m: out / f"pretrain-{m}" for m in NEIGHBOURS}}
    steps = ["--steps", "2"] if q else []
    for name, run_dir in pre.items():   # ours: pretrain.py; a neighbouring method: its own file
        script = "pretrain.py" if name == "ours" else f"neighbours/{name}.py"
        run(script, *data, "--out", run_dir, *steps, *small, log=log, done=run_dir / "backbone.pt")
    probe_q = ["--max-steps", "3"] if q else []
    ft_q = ["--steps", "2", "--freeze-steps", "1", "--ramp-steps", "1"] if q else []
    inits = {"random init": ["--init", "random"], **{n: ["--checkpoint", d / "backbone.pt"] for n, d in pre.items()}}
    budgets = ["1"] if q else ["1", "2", "all"]
    plan = []   # (experiment, model, script, flags, folder name)
    for name, init in inits.items():
        plan.append(("linear probe", name, "linear_probe.py", init, f"probe-{name.split()[0]}"))
    for name, init in inits.items():
        label = "from scratch" if name == "random init" else f"fine-tuned ({name})"
        plan.append(("fine-tune, 1 training case(s)", label, "finetune.py", [*init, "--train-cases", "1"],
                     f"finetune-1-{name.split()[0]}"))
    for budget in budgets:
        limit = [] if budget == "all" else ["--train-cases", budget]
        exp = f"fine-tune, {budget} training case(s)"
        if budget != "1":
            plan.append((exp, "from scratch", "finetune.py", ["--init", "random", *limit], f"finetune-{budget}-random"))
            plan.append((exp, "fine-tuned (ours)", "finetune.py", [*inits["ours"], *limit], f"finetune-{budget}-ours"))
        plan.append((exp, "MedContext (from scratch)", "neighbours/medcontext.py", ["--init", "random", *limit],
                     f"finetune-{budget}-medcontext"))
        if budget == "1":
            plan.append((exp, "MedContext + ours", "neighbours/medcontext.py", [*inits["ours"], *limit],
                         f"finetune-{budget}-medcontext-ours"))
    rows = {}
    for fold in folds:
        for exp, name, script, flags, folder in plan:
            d = out / "neighbours" / f"{folder}-fold{fold}"
            extra = probe_q if script == "linear_probe.py" else ft_q
            workers = small if script != "linear_probe.py" else small[2:]   # the probe reads no DataLoader
            run(script, *data, *flags, "--out", d, "--folds", "2" if q else "3", "--fold", fold, *extra, *workers,
                log=log, done=d / "results.json")
            rows.setdefault((exp, name), []).append(result(d))
    from preprocess import resolve_data_dir
    agreement = agreement_rows(resolve_data_dir(args.data), pre, level=2) if not q else None
    write_neighbours_report(out, rows, pre, log, (time.time() - t0) / 60, agreement)
    return rows


def matching_agreement(backbone, data_dir, level, pairs=64, patch_size=(32, 32, 16), seed=123):
    """How often DenseCL's similarity matching agrees with geometry, for one backbone: over
    un-augmented overlapping crop pairs (data.PairDataset), the fraction of view-A locations of
    FPN level `level` whose most similar view-B location (loss.dense_matches on the backbone's
    features) is the geometrically corresponding one or its neighbour (Chebyshev distance <= 1
    cell), among the A locations whose correspondent lies inside B."""
    import torch

    from data import PairDataset
    from loss import dense_matches
    dataset = PairDataset(data_dir, patch_size, num_voxels=16, length=pairs, seed=seed)
    hits = total = 0
    backbone.eval()
    cell = 2 ** level
    for i in range(pairs):
        pair = dataset[i][0]
        offset = torch.from_numpy(pair["coords_b"][0] - pair["coords_a"][0])      # A voxel c is B voxel c + offset
        with torch.no_grad():
            fa, fb = (backbone(torch.from_numpy(pair[f"patch_{v}"])[None, None].float())[level] for v in "ab")
        match = dense_matches(fa.flatten(2), fb.flatten(2))[0]                    # (S_a,)
        dims_a, dims_b = torch.tensor(fa.shape[2:]), torch.tensor(fb.shape[2:])
        grid = torch.stack(torch.meshgrid(*[torch.arange(int(d)) for d in dims_a], indexing="ij"), -1).reshape(-1, 3)
        expected = torch.div(grid * cell + cell // 2 + offset, cell, rounding_mode="floor")   # (S_a, 3) B cells
        inside = ((expected >= 0) & (expected < dims_b)).all(1)
        got = torch.stack([match // (dims_b[1] * dims_b[2]), match // dims_b[2] % dims_b[1], match % dims_b[2]], 1)
        hits += int((((got - expected).abs().max(1).values <= 1) & inside).sum())
        total += int(inside.sum())
    return hits / max(total, 1)


def load_fpn(path):
    """The FPN3d of a backbone file, weights loaded."""
    from convert import read_backbone_file as load_backbone
    from model import FPN3d
    config, state, _ = load_backbone(path)
    fpn = FPN3d(**config)
    fpn.load_state_dict(state)
    return fpn


def agreement_rows(data_dir, pre, level):
    import torch

    from model import FPN3d
    backbones = {name: load_fpn(pre[name] / "backbone.pt") for name in ("ours", "densecl")}
    torch.manual_seed(0)
    random_init = FPN3d(in_channels=1, base_channels=backbones["ours"].channels[0], num_levels=backbones["ours"].num_levels)
    backbones = {"random init": random_init, **backbones}
    return {name: matching_agreement(b, data_dir, level) for name, b in backbones.items()}


def write_neighbours_report(out, rows, pre, log, minutes, agreement=None):
    import numpy as np
    lines = ["| experiment | model | mean Dice ± std over folds | folds | per class (mean over folds) |",
             "|---|---|---|---|---|"]
    for (exp, name), runs in rows.items():
        dice = [r["mean_dice"] for r in runs]
        per = {k: np.mean([r["per_class"][k] for r in runs if r["per_class"][k] is not None])
               for k in runs[0]["per_class"]}
        lines.append(f"| {exp} | {name} | {np.mean(dice):.3f} ± {np.std(dice):.3f} | "
                     f"{', '.join(str(k) for r in runs for k in r['folds'])} | "
                     + ", ".join(f"{k} {v:.2f}" for k, v in per.items()) + " |")
    lines += ["", "| pretraining | steps | final losses | wall time |", "|---|---|---|---|"]
    for name, run_dir in pre.items():
        last = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
        losses = ", ".join(f"{k.replace('loss_', '')} {v:.4f}" for k, v in last.items() if k.startswith("loss_"))
        lines.append(f"| {name} | {last['step']} | {losses} | {last['seconds'] / 60:.1f} min |")
    if agreement:
        lines += ["", "How often the most similar location (DenseCL's positive) is the geometric correspondent "
                  "or its neighbour, FPN level 2, 64 un-augmented demo pairs (evidence.matching_agreement): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items())]
    lines += ["", "Each method's own paper, for scale:", ""] + [f"- {v}" for v in NEIGHBOUR_PAPERS.values()]
    lines += ["", f"Total {minutes:.1f} min (commands skipped because done count 0) on {os.cpu_count()} CPU cores, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.", "", "Commands:", ""]
    lines += [f"    {e['command']}" + (f"    # {e['seconds']:.0f} s" if e["seconds"] else "") for e in log]
    (out / "neighbours.md").write_text("\n".join(lines) + "\n")
    (out / "neighbours.json").write_text(json.dumps(dict(
        results=[dict(experiment=e, model=n, folds=[r["folds"] for r in runs], mean_dice=[r["mean_dice"] for r in runs])
                 for (e, n), runs in rows.items()], commands=log, minutes=minutes), indent=2))
    print("\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- report and figures

def write_report(out, rows, pretraining, figures, log, minutes):
    lines = ["| experiment | model | mean Dice ± std over folds | per class |", "|---|---|---|---|"]
    for (exp, name), r in rows.items():
        per = ", ".join(f"{k} {v:.2f}" for k, v in r["per_class"].items() if v is not None)
        lines.append(f"| {exp} | {name} | {fmt(r)} | {per} |")
    lines += ["", "Paper, for scale: " + PAPER["linear probe"] + "; " + PAPER["fine-tune"] + ".", ""]
    lines += ["| pretraining | steps | final L_c | chance ln(2N-1) | L_c / chance | final L_r | wall time |",
              "|---|---|---|---|---|---|---|"]
    for name, p in pretraining.items():
        lines.append(f"| {name} | {p['steps']} | {p['l_c']:.3f} | {p['chance']:.3f} | {p['l_c'] / p['chance']:.3f} | "
                     f"{p['l_r']:.4f} | {p['seconds'] / 60:.1f} min |")
    lines += ["", f"Total {minutes:.1f} min on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
              f"torch threads from OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. Figures: "
              + ", ".join(figures), "", "Commands:", ""]
    lines += [f"    {e['command']}" + (f"    # {e['seconds']:.0f} s" if e["seconds"] else "") for e in log]
    (out / "evidence.md").write_text("\n".join(lines) + "\n")
    (out / "evidence.json").write_text(json.dumps(dict(
        results=[dict(experiment=e, model=n, mean_dice=r["mean_dice"], std_dice=r["std_dice"],
                      folds=r["folds"], per_class=r["per_class"], seconds=r.get("seconds")) for (e, n), r in rows.items()],
        pretraining={k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in pretraining.items()},
        commands=log, minutes=minutes), indent=2))
    print("\n" + "\n".join(lines))


def make_figures(out, data_arg, pre, pretraining, budgets, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from convert import read_backbone_file as load_backbone
    from downstream import predict_volume
    from data import load_case
    from predict import load_model
    from model import FPN3d
    from preprocess import resolve_data_dir

    data_dir = resolve_data_dir(data_arg)
    names = []

    # (a) Dice vs labelled cases (Fig. 1 of the paper)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, marker in (("from scratch", "o"), ("fine-tuned (ours)", "s")):
        r = [rows[(f"fine-tune, {b} training case(s)", name)] for b in budgets]
        ax.errorbar(range(len(budgets)), [x["mean_dice"] for x in r], [x["std_dice"] for x in r], marker=marker,
                    capsize=3, label=name)
    ax.set_xticks(range(len(budgets)), [f"{b} ({len(r['train_cases']['0'])})" if b == "all" else b
                                        for b, r in zip(budgets, (rows[(f"fine-tune, {b} training case(s)", "from scratch")]
                                                                  for b in budgets))])
    ax.set_xlabel("labelled training cases per fold")
    ax.set_ylabel("mean Dice (held-out, 3 folds)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Fine-tuned vs from scratch (demo)")
    fig.tight_layout()
    fig.savefig(out / "dice_vs_labels.png", dpi=110)
    plt.close(fig)
    names.append("dice_vs_labels.png")

    # (b) one held-out slice: image, ground truth, scratch, fine-tuned (smallest budget, fold 0)
    b = budgets[0]
    models = {k: load_model(out / f"finetune-{b}-{k.split()[0]}" / "model_fold0.pt") for k in ("from scratch", "fine-tuned")}
    test_id = result(out / f"finetune-{b}-from")["test_cases"]["0"][0]
    case = load_case(data_dir, test_id)
    image, label = np.asarray(case["image"], np.float32), np.asarray(case["label"])
    z = int(np.argmax((label > 0).sum((0, 1))))
    preds = {k: predict_volume(m, image, tuple(ck["patch_size"]), torch.device("cpu")).numpy() for k, (m, ck) in models.items()}
    panels = {"image": None, "ground truth": label, **{f"{k} ({b} case)": p for k, p in preds.items()}}
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, (title, seg) in zip(axes, panels.items()):
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=0.4, vmax=0.7)   # ~[-400, 300] HU
        if seg is not None:
            ax.imshow(np.ma.masked_equal(seg[:, :, z].T, 0), cmap="tab10", vmin=0, vmax=9, origin="lower",
                      alpha=0.55, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"held-out case {test_id}, slice z={z} (RAS; patient right on the right)")
    fig.tight_layout()
    fig.savefig(out / "segmentation_slice.png", dpi=110)
    plt.close(fig)
    names.append("segmentation_slice.png")

    # (c) first three principal components of the voxel features, as RGB
    def features(backbone):
        with torch.no_grad():
            pyramid = backbone.eval()(torch.from_numpy(image)[None, None])
        levels = []
        for l, f in enumerate(pyramid):
            f = torch.nn.functional.interpolate(f, scale_factor=2 ** l, mode="nearest")[..., :image.shape[0], :image.shape[1], :image.shape[2]]
            f = f[0, :, :, :, z].reshape(f.shape[1], -1)                      # (C_l, X * Y)
            f = (f - f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)
            levels.append(f / f.shape[0] ** 0.5)                              # each level weighs the same
        f = torch.cat(levels).T                                               # (X * Y, sum C_l)
        u, s, v = torch.pca_lowrank(f - f.mean(0), q=3, center=False)
        rgb = (f - f.mean(0)) @ v                                             # (X * Y, 3)
        lo, hi = rgb.quantile(0.02, 0), rgb.quantile(0.98, 0)
        return ((rgb - lo) / (hi - lo)).clamp(0, 1).reshape(image.shape[0], image.shape[1], 3).numpy()

    backbones = {name: load_fpn(pre[name] / "backbone.pt") for name in ("vox2vec", "ours")}
    torch.manual_seed(0)
    backbones = {"random init": FPN3d(**load_backbone(pre["ours"] / "backbone.pt")[0]), **backbones}
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    axes[0].imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=0.4, vmax=0.7)
    axes[0].set_title("image")
    for ax, (name, bb) in zip(axes[1:], backbones.items()):
        ax.imshow(features(bb).transpose(1, 0, 2), origin="lower")
        ax.set_title(f"{name}: PCA of features")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "feature_pca.png", dpi=110)
    plt.close(fig)
    names.append("feature_pca.png")

    # (d) pretraining curves
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, p in pretraining.items():
        steps = [r["step"] for r in p["rows"]]
        axes[0].plot(steps, [r["loss_contrastive"] for r in p["rows"]], label=f"{name} L_c")
        axes[0].axhline(p["chance"], ls="--", c="gray")
        axes[0].axhline(0.85 * p["chance"], ls=":", c="gray")
        if any(r["loss_recon"] for r in p["rows"]):
            axes[1].plot(steps, [r["loss_recon"] for r in p["rows"]], label=f"{name} L_r")
    axes[0].set_title("InfoNCE L_c (dashed: chance ln(2N-1); dotted: 0.85 x chance)")
    axes[1].set_title("reconstruction L_r")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pretraining_curves.png", dpi=110)
    plt.close(fig)
    names.append("pretraining_curves.png")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="demo")
    p.add_argument("--out", default="runs/evidence")
    p.add_argument("--quick", action="store_true", help="2 steps of everything: checks the pipeline, not the numbers")
    p.add_argument("--ablation", action="store_true", help="Table 1's rows on the demo (reuses the main run's pretrainings)")
    p.add_argument("--neighbours", action="store_true",
                   help="Models Genesis, MIM, DenseCL and MedContext beside ours (reuses the main run's pretraining)")
    p.add_argument("--fold", type=int, nargs="+", choices=[0, 1, 2], help="--neighbours: run these folds only [all three]")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--force", action="store_true", help="use an --out that holds results of other data or --quick")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    neighbours(a) if a.neighbours else ablation(a) if a.ablation else main(a)
