"""What pretraining buys, measured: every number and figure of docs/results.md comes from this
script, which only runs the stage scripts' own command lines (from the repository root).

    python experiments/evidence.py                        # the demo evidence (2 CPU cores:
    docs/results.md says how long)
    python experiments/evidence.py --data LABELLED --unlabelled UNLABELLED [--preset demo]   # the
    same on your scans
    python experiments/evidence.py --neighbours           # Models Genesis, MIM, DenseCL,
    MedContext beside ours
    python experiments/evidence.py --ablation             # Table 1's rows (after the above)
    python experiments/evidence.py --quick --data DIR --unlabelled U   # a few steps of everything
    (the tests run this)

The protocol (PROTOCOL below; changed only by a commit made before the run that uses it):
1. Corpora kept apart. Pretraining reads the unlabelled corpus (`pretrain.py --data demo`: 200
phantoms of
   their own seed stream; a corpus that shares a scan with the labelled set is refused); the
   labelled set has a fixed split (DATA/split.json, or OUT/split.json made by demo.demo_split): a
   training pool, validation cases (choosing a recipe only) and test cases (every reported Dice).
   The control pretrains on the labelled training pool alone.
2. A pretraining curve: ours and vox2vec (--method vox2vec) with the demo's recipe (`pretrain`:
   the one experiments/pretrain_grid.py chose on the validation cases, whose `steps` are the
   quick start's budget), run on to `curve_steps` (the end of the curve, where the aims are read),
   backbones kept at `keep_steps` (0 = random init; the default budget among them); a linear probe
   (fitted on the training pool, scored on the test cases) of every kept backbone. "random init"
   is ours at step 0. At a constant lr the curve's backbone at the default budget is the default
   run's own (the data order does not depend on the run's length); under a schedule it is a run
   of its own.
3. The shortcut diagnostic (diagnostics.py) of every backbone, random init included, on
   un-augmented pairs cropped from the test cases with the pretraining patch.
4. Fine-tuning as a paired comparison, pretrained (ours, end of the curve) vs from scratch, at
   `budgets` labelled cases, each with `draws[budget]` draws: draw d takes its cases with
   --draw d and runs with --seed d, so the two arms see the same cases, batches, augmentation
   and head initialisation. The recipe: a grid of backbone lr scale x schedule, run on draw 0
   with one case, scored on the validation cases; each arm takes its best cell, then runs every
   draw with it. Schedules: "freeze-ramp" is the paper's (backbone frozen, then an exponential
   ramp, `freeze_ramp`) with BatchNorm trainable while frozen (the authors' Lightning setting);
   "warm-up" trains everything from step 0 after a linear warm-up of every lr (nnssl). From
   scratch finetune.py never freezes (a frozen random backbone is no recipe anyone uses), so
   there the "freeze-ramp" cells are plain training at the scaled lr. Both arms: --aug none, the
   paper's protocol (docs/augmentation.md shows what nnU-Net's augmentation costs the demo).
   Reported: test Dice every `eval_every` steps (convergence), the mean paired difference
   (pretrained - scratch, one pair per draw) with a percentile bootstrap 95% interval, the steps
   each arm needs to reach `target_dice`, and how far fine-tuning moved each backbone level.
   Draw 0 of one case is also fine-tuned from the backbone at the default budget (the quick
   start's cell).
Aims: probe ours - random >= +0.10 at the end of the curve, ours >= vox2vec; fine-tuned - scratch
>= +0.05 at one case with the interval above 0; ours' retrieval at large view offsets >= 0.5 x at
small ones (a necessary sign that the features do not match voxels by their place in the crop,
not a sufficient one, so it is read beside the probe and the R^2 change).
Results: OUT/evidence.md, OUT/evidence.json (the headline keys and every cell), OUT/*.png, every
path relative to the repository. A re-run skips every command whose output exists: an
interrupted run continues.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: the stage files
import runtime  # noqa: E402
from data import InputError, list_cases, read_dataset  # noqa: E402
from experiments.lab import command_lines, run_stage, shown  # noqa: E402

# The pretraining recipe is the one experiments/pretrain_grid.py chose on the validation cases
# (pretrain.DEMO holds the same values, so the quick start reproduces this protocol's cells).
PROTOCOL = dict(
    pretrain=dict(
        steps=1260, lr=3e-4, warmup_steps=0, lr_schedule="constant", batch_pairs=8, num_voxels=128
    ),
    # curve_steps: the wall time of the earlier 6,000-step run of 4 pairs (docs/history.md), at 8
    # pairs
    curve_steps=4200,
    keep_steps=(0, 100, 300, 700, 1260, 2100, 3150),
    budgets=(1, 2),
    draws={1: 5, 2: 3},
    lr_scales=(1.0, 1 / 3, 1 / 10),
    schedules=("freeze-ramp", "warm-up"),
    warmup_steps=50,
    freeze_ramp=dict(freeze_steps=150, ramp_steps=40, ramp_start_lr=2e-4),
    eval_every=50,
    target_dice=0.6,
    aug="none",
    n_boot=10_000,
    shortcut_pairs=48,
    agreement_pairs=64,
)
# --quick: every command of the protocol with a few steps; checks the pipeline, not the numbers.
QUICK = dict(
    PROTOCOL,
    pretrain=dict(PROTOCOL["pretrain"], steps=2, warmup_steps=0),
    curve_steps=3,
    keep_steps=(0, 2),
    budgets=(1,),
    draws={1: 1},
    lr_scales=(1.0,),
    freeze_ramp=dict(freeze_steps=1, ramp_steps=1, ramp_start_lr=2e-4),
    warmup_steps=1,
    eval_every=2,
    shortcut_pairs=4,
    agreement_pairs=4,
)
ARMS = {"scratch": "from scratch", "pretrained": "fine-tuned (ours)"}
# The paper's numbers, for scale (real CT / MRI, 50,000 pretraining steps on an A100).
PAPER = {
    "linear probe": "MRI (Table 1): vox2vec 58.8, ours 65.7; CT/BTCV (Table 2): vox2vec 62.0, "
    "ours 65.6",
    "fine-tune": "MRI (Table 3): 4 cases 48.4 -> 57.7, 8 cases 63.3 -> 69.3, 42 cases 77.1 -> "
    "78.8 (scratch -> fine-tuned)",
}


def run(script, *args, log, done=None):
    """One stage's own command line, from the repository root; skipped when its output exists."""
    run_stage(script, *args, log=log, done=done, name="evidence.py")


def result(path):
    """A run's results.json, with experiments/finetune_curve.py's curve.json (curve,
    weight_change) if it has one."""
    curve = Path(path) / "curve.json"
    return {
        **json.loads((Path(path) / "results.json").read_text()),
        **(json.loads(curve.read_text()) if curve.is_file() else {}),
    }


def pretrain_flags(recipe):
    """pretrain.py flags of a recipe dict (steps, lr, warmup_steps, lr_schedule, batch_pairs,
    num_voxels)."""
    return [w for k, v in recipe.items() for w in (f"--{k.replace('_', '-')}", v)]


def curve_flags(proto):
    """The recipe's flags for a run to the end of the curve (the neighbours' and the ablation's)."""
    return pretrain_flags(dict(proto["pretrain"], steps=proto["curve_steps"]))


def pretrain_summary(run_dir):
    """Last logged L_c and L_r, the chance level ln(2N - 1) of InfoNCE with N voxel pairs per view,
    the wall time."""
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    import torch  # here, not at the top: the rest of this script only runs the stage scripts

    cfg = torch.load(Path(run_dir) / "backbone.pt", weights_only=True)["pretrain_config"]
    chance = math.log(2 * cfg["num_voxels"] * cfg["batch_pairs"] - 1)
    return dict(
        rows=rows,
        chance=chance,
        l_c=rows[-1]["loss_contrastive"],
        l_r=rows[-1]["loss_recon"],
        steps=rows[-1]["step"],
        seconds=rows[-1]["seconds"],
        patch_size=cfg["patch_size"],
    )


def data_folder(arg, demo_part=""):
    """--data / --unlabelled: a preprocessed folder, or `demo` (data.read_dataset)."""
    return read_dataset(arg, demo_part)[0]


def cases_of(folder, labelled=None):
    return list_cases(read_dataset(folder)[1], labelled)


def check_inputs(args):
    """Before any work: the labelled set and a corpus kept apart from it, each a preprocess.py
    folder; a labelled set large enough for a training pool, a validation and a test case."""
    from data import read_case

    if args.unlabelled is None:
        if args.data != "demo":
            raise InputError(
                "--unlabelled UNLABELLED_DIR is needed with your own --data: pretraining reads a "
                "corpus kept apart from the labelled scans (a preprocess.py output folder)"
            )
        args.unlabelled = "demo"  # pretrain.py --data demo: the demo's unlabelled corpus
    data, corpus = data_folder(args.data), data_folder(args.unlabelled, demo_part="unlabelled")
    labelled = cases_of(data, labelled=True)
    if len(labelled) < 3:
        raise InputError(
            f"--data {args.data}: {len(labelled)} labelled case(s); the protocol needs a training "
            "pool, a validation and a test case, at least 3"
        )
    scans = lambda folder, ids: {read_case(folder, c)["meta"].get("image_file") for c in ids}
    shared = scans(data, labelled) & scans(corpus, cases_of(corpus))
    if Path(data).resolve() == Path(corpus).resolve() or shared:
        raise InputError(
            f"--unlabelled {args.unlabelled} is not kept apart from --data {args.data}: "
            + (
                f"{len(shared)} of its scans are labelled cases (e.g. {sorted(shared)[0]})"
                if shared
                else "it is the same folder"
            )
            + "; pretrain on a corpus without the labelled scans"
        )


def claim_output(args):
    """OUT continues an earlier run of the same protocol (finished commands are skipped); one made
    with other data or another --quick would mix into its tables: refused unless --force."""
    check_inputs(args)
    out = Path(args.out)
    runtime.make_folder(out, "--out")
    record = out / "evidence-args.json"
    made = dict(
        data=str(args.data),
        unlabelled=str(args.unlabelled),
        quick=bool(args.quick),
        preset=args.preset,
    )
    if record.is_file() and json.loads(record.read_text()) != made and not args.force:
        raise InputError(
            f"{out} holds results made with {record.read_text().strip()}, not {made}; "
            "choose another --out or pass --force"
        )
    record.write_text(json.dumps(made))
    return out


def split_file(data_arg, out):
    """The labelled set's fixed split: DATA/split.json (preprocess.py --demo writes one), else one
    made here (demo.demo_split over the labelled cases) and kept as OUT/split.json."""
    from data import read_split
    from demo import demo_split

    data_dir = data_folder(data_arg)
    path = data_dir / "split.json"
    if not path.is_file():
        path = out / "split.json"
        if not path.is_file():
            path.write_text(json.dumps(demo_split(cases_of(data_dir, labelled=True)), indent=1))
    split = read_split(path, cases_of(data_dir, labelled=True))
    if not split["val"]:
        raise InputError(f"{path}: the 'val' list is empty; the recipe grid is scored on it")
    return path


def recipe_flags(recipe, proto, arm):
    """finetune.py flags of one grid cell {"schedule", "lr_scale"} for one arm. From scratch
    finetune.py never freezes, so there a "freeze-ramp" cell is plain training at the scaled lr."""
    flags = [
        "--backbone-lr-scale",
        f"{recipe['lr_scale']:.6g}",
        "--warmup-steps",
        proto["warmup_steps"] if recipe["schedule"] == "warm-up" else 0,
    ]
    if arm == "scratch":
        return flags
    if recipe["schedule"] == "warm-up":
        return flags + ["--freeze-steps", "0", "--ramp-steps", "0"]
    return (
        flags
        + [w for k, v in proto["freeze_ramp"].items() for w in (f"--{k.replace('_', '-')}", v)]
        + ["--frozen-bn", "train"]
    )


def recipe_name(recipe):
    divisor = round(1 / recipe["lr_scale"])
    return f"{recipe['schedule']}, backbone lr x {'1' if divisor == 1 else f'1/{divisor}'}"


def recipe_folder(recipe):
    return f"{recipe['schedule']}-lr{round(1 / recipe['lr_scale'])}"


def main(args):
    out = claim_output(args)
    proto = QUICK if args.quick else PROTOCOL
    q = args.quick
    data, unlabelled = ["--data", args.data], ["--data", args.unlabelled]
    preset = ["--preset", args.preset] if args.preset else (["--preset", "demo"] if q else [])
    split = split_file(args.data, out)
    log, t0 = [], time.time()
    corpus = corpus_sizes(args, split)
    print(
        f"corpora: {corpus['unlabelled_cases']} unlabelled (pretraining) : "
        f"{corpus['labelled_cases']} labelled ({corpus['train_pool']} training pool / "
        f"{corpus['val']} validation / {corpus['test']} test)",
        flush=True,
    )

    # 1. pretraining: ours and vox2vec on the unlabelled corpus to the end of the curve, ours on the
    #    labelled pool (control) for the default budget
    recipe, default, end = proto["pretrain"], proto["pretrain"]["steps"], proto["curve_steps"]
    curve = [*curve_flags(proto), "--keep-steps", *proto["keep_steps"], "--workers", "0", *preset]
    pre = {
        "ours": out / "pretrain-ours",
        "vox2vec": out / "pretrain-vox2vec",
        "pool": out / "pretrain-pool",
    }
    run(
        "experiments/pretrain_curve.py",
        *unlabelled,
        "--out",
        pre["ours"],
        *curve,
        log=log,
        done=pre["ours"] / "backbone.pt",
    )
    run(
        "experiments/pretrain_curve.py",
        *unlabelled,
        "--method",
        "vox2vec",
        "--out",
        pre["vox2vec"],
        *curve,
        log=log,
        done=pre["vox2vec"] / "backbone.pt",
    )
    pool_preset = preset or (
        ["--preset", "demo"] if args.data == "demo" else []
    )  # a path is not `demo`
    run(
        "pretrain.py",
        "--data",
        data_folder(args.data),
        "--split",
        split,
        "--out",
        pre["pool"],
        *pretrain_flags(recipe),
        "--workers",
        "0",
        *pool_preset,
        log=log,
        done=pre["pool"] / "backbone.pt",
    )
    if (
        recipe["lr_schedule"] != "constant"
    ):  # a schedule's shape depends on --steps: the default run is its own
        pre["default"] = out / "pretrain-default"
        run(
            "pretrain.py",
            *unlabelled,
            "--out",
            pre["default"],
            *pretrain_flags(recipe),
            "--workers",
            "0",
            *preset,
            log=log,
            done=pre["default"] / "backbone.pt",
        )
    pretraining = {k: pretrain_summary(v) for k, v in pre.items()}

    # 2. the probe along pretraining (fitted on the training pool, scored on the test cases)
    probe_q = ["--max-steps", "3"] if q else []
    steps = sorted({*proto["keep_steps"], end})
    backbones = {
        (m, s): pre[m] / (f"backbone_step{s}.pt" if s != end else "backbone.pt")
        for m in ("ours", "vox2vec")
        for s in steps
    }
    backbones[("pool", default)] = pre["pool"] / "backbone.pt"
    if "default" in pre:
        backbones[("ours", default)] = pre["default"] / "backbone.pt"
    probes = {}
    for (m, s), path in backbones.items():
        d = out / f"probe-{m}-step{s}"
        run(
            "linear_probe.py",
            *data,
            "--split",
            split,
            "--checkpoint",
            path,
            "--out",
            d,
            *probe_q,
            *preset,
            log=log,
            done=d / "results.json",
        )
        probes[(m, s)] = result(d)

    # 3. the shortcut diagnostic of every backbone, random init included
    ends = {
        "random init": backbones[("ours", 0)],
        "vox2vec": backbones[("vox2vec", end)],
        "ours": backbones[("ours", end)],
        f"ours at {default} steps": backbones[("ours", default)],
        "ours, labelled pool only": backbones[("pool", default)],
    }
    shortcut = shortcut_rows(out, args.data, split, ends, pretraining["ours"]["patch_size"], proto)

    # 4. fine-tuning, paired: the recipe grid on the validation cases, then every draw on the test
    # cases
    ft_q = ["--steps", "3", "--bn-batches", "2"] if q else []
    inits = {
        "scratch": ["--init", "random"],
        "pretrained": ["--checkpoint", backbones[("ours", end)]],
    }
    base = [*data, "--split", split, "--aug", proto["aug"], "--workers", "0", *ft_q, *preset]
    grid = [dict(schedule=s, lr_scale=x) for s in proto["schedules"] for x in proto["lr_scales"]]
    cells, chosen = {}, {}
    for arm, init in inits.items():
        for recipe in grid:
            d = out / f"grid-{arm}-{recipe_folder(recipe)}"
            run(
                "finetune.py",
                *base,
                *init,
                "--train-cases",
                1,
                "--draw",
                0,
                "--seed",
                0,
                "--evaluate-on",
                "val",
                *recipe_flags(recipe, proto, arm),
                "--out",
                d,
                log=log,
                done=d / "results.json",
            )
            cells[(arm, recipe_name(recipe))] = result(d)
        chosen[arm] = max(
            grid, key=lambda r: cells[(arm, recipe_name(r))]["mean_dice"]
        )  # the first of equals
    finetunes = {}
    for budget in proto["budgets"]:
        for draw in range(proto["draws"][budget]):
            for arm, init in inits.items():
                d = out / f"ft-{budget}-{arm}-draw{draw}"
                run(
                    "experiments/finetune_curve.py",
                    *base,
                    *init,
                    "--train-cases",
                    budget,
                    "--draw",
                    draw,
                    "--seed",
                    draw,
                    "--eval-every",
                    proto["eval_every"],
                    *recipe_flags(chosen[arm], proto, arm),
                    "--out",
                    d,
                    log=log,
                    done=d / "curve.json",
                )
                finetunes[(budget, arm, draw)] = result(d)
    d = (
        out / "ft-1-pretrained-default-draw0"
    )  # the quick start's cell: the default budget's backbone
    run(
        "experiments/finetune_curve.py",
        *base,
        "--checkpoint",
        backbones[("ours", default)],
        "--train-cases",
        1,
        "--draw",
        0,
        "--seed",
        0,
        "--eval-every",
        proto["eval_every"],
        *recipe_flags(chosen["pretrained"], proto, "pretrained"),
        "--out",
        d,
        log=log,
        done=d / "curve.json",
    )
    finetunes[("default", "pretrained", 0)] = result(d)

    summary = summarise(
        corpus,
        probes,
        steps,
        shortcut,
        finetunes,
        cells,
        chosen,
        pretraining,
        proto,
        (time.time() - t0) / 60,
    )
    summary["view_offsets"] = offset_rows(args.data, pretraining["ours"]["patch_size"])
    figures = (
        []
        if args.no_figures
        else make_figures(out, args.data, split, ends, pretraining, probes, steps, finetunes, proto)
    )
    write_report(out, summary, figures, log)
    return summary


def corpus_sizes(args, split):
    parts = json.loads(Path(split).read_text())
    return dict(
        unlabelled_cases=len(cases_of(data_folder(args.unlabelled, demo_part="unlabelled"))),
        labelled_cases=len(cases_of(data_folder(args.data), labelled=True)),
        train_pool=len(parts["train"]),
        val=len(parts["val"]),
        test=len(parts["test"]),
    )


def shortcut_rows(out, data_arg, split, backbones, patch_size, proto):
    """diagnostics.shortcut_diagnostic of each backbone on the test cases (in OUT/shortcut.json)."""
    path = out / "shortcut.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    import torch

    from experiments.diagnostics import shortcut_diagnostic

    test_ids = json.loads(Path(split).read_text())["test"]
    rows = {}
    for name, file in backbones.items():
        key = f"{name} | {shown(file)} | {list(patch_size)} | {proto['shortcut_pairs']}"
        if key not in known:
            torch.manual_seed(0)
            known[key] = shortcut_diagnostic(
                load_fpn(file),
                data_folder(data_arg),
                tuple(patch_size),
                pairs=proto["shortcut_pairs"],
                case_ids=test_ids,
            )
            path.write_text(json.dumps(known, indent=1))
        rows[name] = known[key]
    return rows


def offset_rows(data_arg, patch_size):
    """How far the two views of a pretraining pair move against each other relative to the patch
    (diagnostics.view_offsets), on a volume of the labelled set's median shape with the pretraining
    patch, and at the paper's geometry."""
    import numpy as np

    from experiments.diagnostics import PAPER_GEOMETRY, view_offsets

    shapes = [c["shape"] for c in read_dataset(data_arg)[1]["cases"] if c["labelled"]]
    rows = {}
    for name, volume, patch in (
        ("this data", tuple(int(v) for v in np.median(shapes, 0)), tuple(patch_size)),
        ("paper", PAPER_GEOMETRY["volume"], PAPER_GEOMETRY["patch"]),
    ):
        o = view_offsets(volume, patch, pairs=1000)
        rows[name] = dict(
            volume=list(volume),
            patch=list(patch),
            mean=o.mean(0).round(3).tolist(),
            median=np.median(o, 0).round(3).tolist(),
        )
    return rows


def steps_to(curve, target):
    """The first recorded step whose Dice reaches target, or None."""
    return next((step for step, dice in curve if dice >= target), None)


def summarise(
    corpus, probes, steps, shortcut, finetunes, cells, chosen, pretraining, proto, minutes
):
    """Every cell of the protocol, and the headline numbers under evidence.json's keys."""
    import numpy as np

    from experiments.diagnostics import paired_bootstrap

    end, default = steps[-1], proto["pretrain"]["steps"]
    s = dict(corpus=corpus, protocol=json.loads(json.dumps(proto)))
    s["probe"] = {
        "random": probes[("ours", 0)]["mean_dice"],
        "vox2vec": probes[("vox2vec", end)]["mean_dice"],
        "ours": probes[("ours", end)]["mean_dice"],
        "ours_labelled_pool_only": probes[("pool", default)]["mean_dice"],
        "random_vox2vec_arch": probes[("vox2vec", 0)]["mean_dice"],
        "ours_default_steps": probes[("ours", default)]["mean_dice"],
    }
    s["probe_curve"] = {
        m: {str(st): probes[(m, st)]["mean_dice"] for st in steps} for m in ("ours", "vox2vec")
    }
    s["grid"] = {f"{arm} | {name}": r["mean_dice"] for (arm, name), r in cells.items()}
    s["chosen_recipe"] = {arm: recipe_name(r) for arm, r in chosen.items()}
    s["chosen_recipe_cells"] = chosen
    for budget in proto["budgets"]:
        draws = range(proto["draws"][budget])
        arm = {a: [finetunes[(budget, a, d)] for d in draws] for a in ARMS}
        diffs = [p["mean_dice"] - r["mean_dice"] for p, r in zip(arm["pretrained"], arm["scratch"])]
        mean, (lo, hi) = paired_bootstrap(diffs, n_boot=proto["n_boot"])
        levels = sorted(arm["pretrained"][0]["weight_change"]["0"], key=int)
        s[f"finetune_{budget}"] = dict(
            scratch=float(np.mean([r["mean_dice"] for r in arm["scratch"]])),
            pretrained=float(np.mean([r["mean_dice"] for r in arm["pretrained"]])),
            paired_diff=mean,
            ci95=[lo, hi],
            per_draw={a: [r["mean_dice"] for r in rs] for a, rs in arm.items()},
            steps_to_target={
                a: [steps_to(r["curve"]["0"], proto["target_dice"]) for r in rs]
                for a, rs in arm.items()
            },
            curve={
                a: [
                    [st, float(np.mean([r["curve"]["0"][i][1] for r in rs]))]
                    for i, (st, _) in enumerate(rs[0]["curve"]["0"])
                ]
                for a, rs in arm.items()
            },
            weight_change={
                a: {lv: float(np.mean([r["weight_change"]["0"][lv] for r in rs])) for lv in levels}
                for a, rs in arm.items()
            },
            train_cases=[r["train_cases"]["0"] for r in arm["scratch"]],
        )
    quick = finetunes[("default", "pretrained", 0)]
    s["quick_start"] = dict(
        steps=default,
        probe=s["probe"]["ours_default_steps"],
        probe_random=s["probe"]["random"],
        finetune_1=quick["mean_dice"],
        scratch_1=finetunes[(1, "scratch", 0)]["mean_dice"],
        seconds=quick.get("seconds"),
    )
    s["shortcut"] = dict(
        retrieval_small_offset=shortcut["ours"]["retrieval_small_offset"],
        retrieval_large_offset=shortcut["ours"]["retrieval_large_offset"],
        r2_random_init=shortcut["random init"]["r2"],
        r2_ours=shortcut["ours"]["r2"],
        every_backbone=shortcut,
    )
    s["pretraining"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in pretraining.items()
    }
    s["wall_minutes_by_part"] = wall_by_part(probes, finetunes, cells, pretraining)
    s["wall_minutes"] = minutes
    return s


def wall_by_part(probes, finetunes, cells, pretraining):
    """Minutes of each part, from the outputs' own clocks (a resumed run counts them once)."""
    return dict(
        pretraining=sum(p["seconds"] for p in pretraining.values()) / 60,
        probes=sum(r.get("seconds") or 0 for r in probes.values()) / 60,
        recipe_grid=sum(r.get("seconds") or 0 for r in cells.values()) / 60,
        finetune=sum(r.get("seconds") or 0 for r in finetunes.values()) / 60,
    )


def ablation(args):
    """Table 1's rows under the main protocol (after `python experiments/evidence.py` into the same
    --out: it
    supplies the vox2vec and ours rows): each variant pretrains on the unlabelled corpus for the
    same steps; the probe is fitted on the training pool and scored on the test cases."""
    out = claim_output(args)
    proto = QUICK if args.quick else PROTOCOL
    preset = (
        ["--preset", args.preset] if args.preset else (["--preset", "demo"] if args.quick else [])
    )
    split = split_file(args.data, out)
    log, rows = [], {}
    end = proto["curve_steps"]
    variants = {
        "vox2vec baseline": (out / "pretrain-vox2vec", None),
        "+ local augmentations": (
            out / "ablation-localaug",
            ["--arch", "vox2vec", "--aug", "local", "--recon-weight", "0"],
        ),
        "L_r only (restorative)": (
            out / "ablation-recon",
            ["--arch", "vox2vec", "--aug", "local", "--contrastive-weight", "0"],
        ),
        "+ L_c + L_r (hybrid)": (out / "ablation-hybrid", ["--arch", "vox2vec", "--aug", "local"]),
        "+ balanced architecture (ours)": (out / "pretrain-ours", None),
    }
    for name, (run_dir, flags) in variants.items():
        if flags is not None:
            run(
                "pretrain.py",
                "--data",
                args.unlabelled,
                "--out",
                run_dir,
                *curve_flags(proto),
                "--workers",
                "0",
                *flags,
                *preset,
                log=log,
                done=run_dir / "backbone.pt",
            )
        probe = out / (
            "probe-"
            + run_dir.name.replace("pretrain-", "")
            + (f"-step{end}" if flags is None else "")
        )
        run(
            "linear_probe.py",
            "--data",
            args.data,
            "--split",
            split,
            "--checkpoint",
            run_dir / "backbone.pt",
            "--out",
            probe,
            *(["--max-steps", "3"] if args.quick else []),
            *preset,
            log=log,
            done=probe / "results.json",
        )
        rows[name] = result(probe)
    lines = [
        "| Table 1 row (demo) | linear probe, mean Dice on the test cases | paper (MRI) |",
        "|---|---|---|",
    ]
    paper = ["58.8", "62.1", "44.4", "-", "65.7"]
    lines += [f"| {n} | {r['mean_dice']:.3f} | {p} |" for (n, r), p in zip(rows.items(), paper)]
    lines += ["", "Commands:", ""] + command_lines(log)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


# ----------------------------------------------------------------------------- neighbouring methods

NEIGHBOURS = ("genesis", "mim", "densecl")
# What each method's own paper reports, for scale (different data, networks and budgets).
NEIGHBOUR_PAPERS = {
    "genesis": "Models Genesis (Zhou et al. 2021): the restorative row L_r only of our paper's "
    "Table 1 (MRI): 44.4",
    "mim": "3D MIM (Chen et al. 2023): faster convergence and higher Dice than from scratch "
    "(multi-organ CT, BraTS)",
    "densecl": "DenseCL on 2-D ultrasound (seed poster): up to +3.9 mIoU over no pretraining at "
    "1% labels",
    "medcontext": "MedContext (Gani et al. 2024): gains over plain supervised training, largest "
    "in few-shot settings",
}


def neighbours(args):
    """The neighbouring methods under the main protocol (run `python experiments/evidence.py` into
    the same
    --out first: it supplies ours, the scratch arm, the draws and the chosen recipes). Each
    pretraining method (its own file in experiments/neighbours/) pretrains on the same unlabelled
    corpus for
    the same steps, gets a linear probe on the test cases and the one-case fine-tune over the same
    draws with the pretrained arm's recipe; MedContext (a training method, no pretraining) runs
    the one-case draws from scratch with the scratch arm's recipe and on top of ours with the
    pretrained arm's. Differences are paired per draw against the main run's scratch arm."""
    out = claim_output(args)
    proto = QUICK if args.quick else PROTOCOL
    if not (out / "evidence.json").is_file():
        raise InputError(
            "--neighbours compares against the main run: run `python experiments/evidence.py` "
            f"with --out {out} (and the same --data) first"
        )
    main_run = json.loads((out / "evidence.json").read_text())
    recipes = main_run["chosen_recipe_cells"]
    data, unlabelled = ["--data", args.data], ["--data", args.unlabelled]
    preset = (
        ["--preset", args.preset] if args.preset else (["--preset", "demo"] if args.quick else [])
    )
    split = split_file(args.data, out)
    log, t0 = [], time.time()
    pre = {m: out / f"pretrain-{m}" for m in NEIGHBOURS}
    for name, run_dir in pre.items():
        run(
            f"experiments/neighbours/{name}.py",
            *unlabelled,
            "--out",
            run_dir,
            *curve_flags(proto),
            "--workers",
            "0",
            *preset,
            log=log,
            done=run_dir / "backbone.pt",
        )
    probe_q = ["--max-steps", "3"] if args.quick else []
    ft_q = ["--steps", "3", "--bn-batches", "2"] if args.quick else []
    base = [
        *data,
        "--split",
        split,
        "--aug",
        proto["aug"],
        "--workers",
        "0",
        "--train-cases",
        1,
        *ft_q,
        *preset,
    ]
    ours = ["--checkpoint", out / "pretrain-ours" / "backbone.pt"]
    plan = {
        m: ("finetune.py", ["--checkpoint", pre[m] / "backbone.pt"], "pretrained")
        for m in NEIGHBOURS
    }
    plan["medcontext"] = ("experiments/neighbours/medcontext.py", ["--init", "random"], "scratch")
    plan["medcontext + ours"] = ("experiments/neighbours/medcontext.py", ours, "pretrained")
    rows, wall = {}, dict(probes=0.0, finetune=0.0)  # seconds by the outputs' own clocks
    for name in plan:
        row = rows[name] = {}
        if name in pre:
            d = out / f"probe-{name}"
            run(
                "linear_probe.py",
                *data,
                "--split",
                split,
                "--checkpoint",
                pre[name] / "backbone.pt",
                "--out",
                d,
                *probe_q,
                *preset,
                log=log,
                done=d / "results.json",
            )
            probe = result(d)
            row["probe"] = probe["mean_dice"]
            wall["probes"] += probe.get("seconds") or 0
        script, init, arm = plan[name]
        row["finetune_1"] = []
        for draw in range(proto["draws"][1]):
            d = out / f"ft-1-{name.replace(' + ', '-')}-draw{draw}"
            run(
                script,
                *base,
                *init,
                "--draw",
                draw,
                "--seed",
                draw,
                *recipe_flags(recipes[arm], proto, arm),
                "--out",
                d,
                log=log,
                done=d / "results.json",
            )
            finetune = result(d)
            row["finetune_1"].append(finetune["mean_dice"])
            wall["finetune"] += finetune.get("seconds") or 0
    agreement = (
        None
        if "densecl" not in pre
        else agreement_rows(
            data_folder(args.data),
            {"ours": out / "pretrain-ours", **pre},
            level=2,
            patch_size=tuple(main_run["pretraining"]["ours"]["patch_size"]),
            pairs=proto["agreement_pairs"],
        )
    )
    summary = write_neighbours_report(
        out, rows, main_run, pre, log, (time.time() - t0) / 60, proto, agreement, wall
    )
    return summary


def load_fpn(path):
    """The FPN3d of a backbone file, weights loaded."""
    from model import FPN3d
    from weights import read_backbone

    config, state, _ = read_backbone(path)
    fpn = FPN3d(**config)
    fpn.load_state_dict(state)
    return fpn


def agreement_rows(data_dir, pre, level, patch_size, pairs):
    import torch

    from experiments.diagnostics import matching_agreement
    from model import FPN3d

    backbones = {name: load_fpn(pre[name] / "backbone.pt") for name in ("ours", "densecl")}
    torch.manual_seed(0)
    random_init = FPN3d(
        in_channels=1,
        base_channels=backbones["ours"].channels[0],
        num_levels=backbones["ours"].num_levels,
    )
    backbones = {"random init": random_init, **backbones}
    return {
        name: matching_agreement(b, data_dir, level, pairs, patch_size)
        for name, b in backbones.items()
    }


def write_neighbours_report(out, rows, main_run, pre, log, minutes, proto, agreement, wall):
    """neighbours.md and neighbours.json. wall: seconds of the probes and the fine-tunes by their
    outputs' own clocks; the pretraining runs' are read from their logs here."""
    import numpy as np

    from experiments.diagnostics import paired_bootstrap

    scratch = main_run["finetune_1"]["per_draw"]["scratch"]
    ref = {
        "random init": dict(probe=main_run["probe"]["random"], finetune_1=scratch),
        "ours": dict(
            probe=main_run["probe"]["ours"],
            finetune_1=main_run["finetune_1"]["per_draw"]["pretrained"],
        ),
    }
    lines = [
        "| model | linear probe (test) | fine-tune, 1 case: mean over draws | per draw | paired "
        "diff vs scratch [95% interval] |",
        "|---|---|---|---|---|",
    ]
    table = {}
    for name, row in {**ref, **rows}.items():
        diff, (lo, hi) = paired_bootstrap(
            np.subtract(row["finetune_1"], scratch), n_boot=proto["n_boot"]
        )
        table[name] = dict(
            probe=row.get("probe"),
            finetune_1=float(np.mean(row["finetune_1"])),
            per_draw=row["finetune_1"],
            paired_diff=diff,
            ci95=[lo, hi],
        )
        probe = f"{row['probe']:.3f}" if row.get("probe") is not None else "-"
        lines.append(
            f"| {name} | {probe} | {np.mean(row['finetune_1']):.3f} | "
            f"{', '.join(f'{v:.3f}' for v in row['finetune_1'])} | {diff:+.3f} [{lo:+.3f}, "
            f"{hi:+.3f}] |"
        )
    lines += ["", "| pretraining | steps | final losses | wall time |", "|---|---|---|---|"]
    wall = {k: v / 60 for k, v in dict(wall, pretraining=0.0).items()}  # seconds -> minutes
    for name, run_dir in pre.items():
        last = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
        wall["pretraining"] += last["seconds"] / 60
        losses = ", ".join(
            f"{k.replace('loss_', '')} {v:.4f}" for k, v in last.items() if k.startswith("loss_")
        )
        lines.append(f"| {name} | {last['step']} | {losses} | {last['seconds'] / 60:.1f} min |")
    if agreement:
        lines += [
            "",
            "How often the most similar location (DenseCL's positive) is the geometric "
            f"correspondent or its neighbour, FPN level 2, {proto['agreement_pairs']} un-augmented "
            "pairs (diagnostics.matching_agreement): "
            + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items()),
        ]
    lines += [
        "",
        "Recipes (the main run's choice on the validation cases): pretrained backbones and "
        "MedContext + ours: "
        + recipe_name(main_run["chosen_recipe_cells"]["pretrained"])
        + "; MedContext from scratch: "
        + recipe_name(main_run["chosen_recipe_cells"]["scratch"])
        + " (from scratch nothing is frozen, as in the main run's scratch arm).",
        "",
        "Each method's own paper, for scale:",
        "",
    ] + [f"- {v}" for v in NEIGHBOUR_PAPERS.values()]
    lines += [
        "",
        "Wall time by the outputs' own clocks (a resumed run counts each command once): "
        f"{sum(wall.values()):.1f} min (pretraining {wall['pretraining']:.1f}, probes "
        f"{wall['probes']:.1f}, fine-tuning {wall['finetune']:.1f}); this invocation {minutes:.1f} "
        f"min (finished commands skipped), {os.cpu_count()} CPU cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "",
        "Commands:",
        "",
    ]
    lines += command_lines(log)
    (out / "neighbours.md").write_text("\n".join(lines) + "\n")
    summary = dict(
        rows=table,
        agreement=agreement,
        commands=log,
        wall_minutes=sum(wall.values()),
        wall_minutes_by_part=wall,
        minutes_this_invocation=minutes,
    )
    (out / "neighbours.json").write_text(json.dumps(summary, indent=1))
    print("\n" + "\n".join(lines))
    return summary


# ----------------------------------------------------------------------------- report and figures


def write_report(out, s, figures, log):
    p, end = s["probe"], s["protocol"]["curve_steps"]
    c = s["corpus"]
    lines = [
        f"Corpora: {c['unlabelled_cases']} unlabelled scans for pretraining : "
        f"{c['labelled_cases']} labelled ({c['train_pool']} training pool / {c['val']} validation "
        f"/ {c['test']} test).",
        "",
        "Linear probe (fitted on the training pool, mean Dice on the test cases) along "
        "pretraining:",
        "",
        "| pretraining steps | " + " | ".join(s["probe_curve"]["ours"]) + " |",
        "|---|" + "---|" * len(s["probe_curve"]["ours"]),
    ]
    for m, row in s["probe_curve"].items():
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    lines += [
        "",
        "How far the two views of a pair move against each other, |offset| / patch per axis "
        "(diagnostics.view_offsets): "
        + "; ".join(
            f"{k}: volume {v['volume']}, patch {v['patch']}, mean {v['mean']}, median {v['median']}"
            for k, v in s["view_offsets"].items()
        )
        + ".",
    ]
    lines += [
        "",
        f"End of the curve ({end} steps): random init {p['random']:.3f}, vox2vec "
        f"{p['vox2vec']:.3f}, ours {p['ours']:.3f}. Ours - random init: "
        f"{p['ours'] - p['random']:+.3f}. At the default budget "
        f"({s['protocol']['pretrain']['steps']} steps, the quick start's): ours "
        f"{p['ours_default_steps']:.3f} ({p['ours_default_steps'] - p['random']:+.3f}); ours "
        f"pretrained on the labelled training pool only {p['ours_labelled_pool_only']:.3f}.",
        "",
        "The quick start's cells (the default budget's backbone; one labelled case, draw 0): "
        f"probe {s['quick_start']['probe']:.3f} vs random init "
        f"{s['quick_start']['probe_random']:.3f}; fine-tuned {s['quick_start']['finetune_1']:.3f} "
        f"vs from scratch {s['quick_start']['scratch_1']:.3f}.",
        "",
        "Shortcut diagnostic (diagnostics.shortcut_diagnostic; un-augmented pairs of the test "
        "cases, retrieval split at the median view offset):",
        "",
        "| backbone | retrieval, small offsets | retrieval, large offsets | large / small | "
        "position R^2 | median offset (voxels, L1) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in s["shortcut"]["every_backbone"].items():
        ratio = (
            r["retrieval_large_offset"] / r["retrieval_small_offset"]
            if r["retrieval_small_offset"]
            else float("nan")
        )
        lines.append(
            f"| {name} | {r['retrieval_small_offset']:.3f} | {r['retrieval_large_offset']:.3f} | "
            f"{ratio:.2f} | {r['r2']:.3f} | {r['median_offset']:.0f} |"
        )
    lines += [
        "",
        "Fine-tuning recipe grid (draw 0, one case, mean Dice on the validation cases); chosen: "
        + "; ".join(f"{ARMS[a]}: {n}" for a, n in s["chosen_recipe"].items()),
        "",
        "| arm | recipe | validation Dice |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k.split(' | ')[0]} | {k.split(' | ')[1]} | {v:.3f} |" for k, v in s["grid"].items()
    ]
    for budget in s["protocol"]["budgets"]:
        f = s[f"finetune_{budget}"]
        lines += [
            "",
            f"Fine-tuning, {budget} labelled case(s), {len(f['per_draw']['scratch'])} draws (test "
            "Dice):",
            "",
            "| arm | mean | per draw | steps to Dice >= " + f"{s['protocol']['target_dice']} | "
            "weight change per backbone level |",
            "|---|---|---|---|---|",
        ]
        for a in ARMS:
            reached = [str(v) if v is not None else "not reached" for v in f["steps_to_target"][a]]
            lines.append(
                f"| {ARMS[a]} | {f[a]:.3f} | {', '.join(f'{v:.3f}' for v in f['per_draw'][a])} | "
                f"{', '.join(reached)} "
                "| "
                + ", ".join(f"{lv}: {v:.2f}" for lv, v in f["weight_change"][a].items())
                + " |"
            )
        lines.append(
            f"\nPaired difference (pretrained - scratch): {f['paired_diff']:+.3f}, bootstrap 95% "
            f"interval [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}]; training cases per draw: "
            f"{f['train_cases']}"
        )
    lines += [
        "",
        "Paper, for scale: " + PAPER["linear probe"] + "; " + PAPER["fine-tune"] + ".",
        "",
        "| pretraining | corpus | steps | patch | final L_c | L_c / chance | final L_r | wall "
        "time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in s["pretraining"].items():
        corpus = "labelled training pool" if name == "pool" else "unlabelled corpus"
        lines.append(
            f"| {name} | {corpus} | {r['steps']} | {'x'.join(map(str, r['patch_size']))} | "
            f"{r['l_c']:.3f} | {r['l_c'] / r['chance']:.3f} | {r['l_r']:.4f} | "
            f"{r['seconds'] / 60:.1f} min |"
        )
    w = s["wall_minutes_by_part"]
    lines += [
        "",
        f"Wall time (each command's own clock): pretraining {w['pretraining']:.1f} min, probes "
        f"{w['probes']:.1f} min, recipe grid {w['recipe_grid']:.1f} min, fine-tuning draws "
        f"{w['finetune']:.1f} min; this invocation {s['wall_minutes']:.1f} min (commands already "
        f"done count 0) on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "Figures: " + ", ".join(figures),
        "",
        "Commands:",
        "",
    ]
    lines += command_lines(log)
    (out / "evidence.md").write_text("\n".join(lines) + "\n")
    s = dict(s, commands=log)
    (out / "evidence.json").write_text(json.dumps(s, indent=1))
    print("\n" + "\n".join(lines))


def make_figures(out, data_arg, split, ends, pretraining, probes, steps, finetunes, proto):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from data import read_case
    from downstream import volume_probabilities
    from weights import load_segmenter

    data_dir = data_folder(data_arg)
    names = []

    # (a) probe Dice vs pretraining steps
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, marker in (("ours", "s"), ("vox2vec", "o")):
        ax.plot(steps, [probes[(m, st)]["mean_dice"] for st in steps], marker=marker, label=m)
    default = proto["pretrain"]["steps"]
    ax.plot(
        [default], [probes[("pool", default)]["mean_dice"]], "k^", label="ours, labelled pool only"
    )
    ax.axvline(default, ls=":", c="gray", label="the default budget")
    ax.set_xscale("symlog", linthresh=100)
    ax.set_xlabel("pretraining steps (0 = random init)")
    ax.set_ylabel("linear probe, mean Dice (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "probe_vs_pretraining.png", dpi=110)
    plt.close(fig)
    names.append("probe_vs_pretraining.png")

    # (b) test Dice vs fine-tuning steps, each draw thin, the mean thick
    fig, axes = plt.subplots(
        1, len(proto["budgets"]), figsize=(5 * len(proto["budgets"]), 3.5), squeeze=False
    )
    for ax, budget in zip(axes[0], proto["budgets"]):
        for arm, colour in (("scratch", "tab:blue"), ("pretrained", "tab:orange")):
            curves = [
                np.asarray(finetunes[(budget, arm, d)]["curve"]["0"])
                for d in range(proto["draws"][budget])
            ]
            for c in curves:
                ax.plot(c[:, 0], c[:, 1], c=colour, lw=0.6, alpha=0.4)
            ax.plot(
                curves[0][:, 0],
                np.mean([c[:, 1] for c in curves], 0),
                c=colour,
                lw=2,
                label=ARMS[arm],
            )
        ax.axhline(proto["target_dice"], ls=":", c="gray")
        ax.set_title(f"{budget} labelled case(s), {proto['draws'][budget]} draws")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("mean Dice (test)")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dice_vs_finetune_steps.png", dpi=110)
    plt.close(fig)
    names.append("dice_vs_finetune_steps.png")

    # (c) one test slice: image, ground truth, scratch, fine-tuned (one case, draw 0)
    models = {ARMS[a]: load_segmenter(out / f"ft-1-{a}-draw0" / "model_fold0.pt") for a in ARMS}
    test_id = json.loads(Path(split).read_text())["test"][0]
    case = read_case(data_dir, test_id, need_label=True)
    image, label = (
        np.asarray(case["image"], np.float32),
        np.asarray(case["label"]),
    )  # (C, X, Y, Z), (X, Y, Z)
    z = int(np.argmax((label > 0).sum((0, 1))))
    preds = {
        k: volume_probabilities(m, image, tuple(ck["patch_size"]), torch.device("cpu"))
        .argmax(0)
        .numpy()
        for k, (m, ck) in models.items()
    }
    image = image[0]
    panels = {
        "image": None,
        "ground truth": label,
        **{f"{k} (1 case)": p for k, p in preds.items()},
    }
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, (title, seg) in zip(axes, panels.items()):
        ax.imshow(
            image[:, :, z].T, cmap="gray", origin="lower", vmin=0.4, vmax=0.7
        )  # ~[-400, 300] HU
        if seg is not None:
            ax.imshow(
                np.ma.masked_equal(seg[:, :, z].T, 0),
                cmap="tab10",
                vmin=0,
                vmax=9,
                origin="lower",
                alpha=0.55,
                interpolation="nearest",
            )
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"test case {test_id}, slice z={z} (RAS; patient right on the right)")
    fig.tight_layout()
    fig.savefig(out / "segmentation_slice.png", dpi=110)
    plt.close(fig)
    names.append("segmentation_slice.png")

    # (d) first three principal components of the voxel features, as RGB
    def features(backbone):
        with torch.no_grad():
            pyramid = backbone.eval()(torch.from_numpy(image)[None, None])
        levels = []
        for l, f in enumerate(pyramid):
            f = torch.nn.functional.interpolate(f, scale_factor=2**l, mode="nearest")[
                ..., : image.shape[0], : image.shape[1], : image.shape[2]
            ]
            f = f[0, :, :, :, z].reshape(f.shape[1], -1)  # (C_l, X * Y)
            f = (f - f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)
            levels.append(f / f.shape[0] ** 0.5)  # each level weighs the same
        f = torch.cat(levels).T  # (X * Y, sum C_l)
        u, s, v = torch.pca_lowrank(f - f.mean(0), q=3, center=False)
        rgb = (f - f.mean(0)) @ v  # (X * Y, 3)
        lo, hi = rgb.quantile(0.02, 0), rgb.quantile(0.98, 0)
        return (
            ((rgb - lo) / (hi - lo)).clamp(0, 1).reshape(image.shape[0], image.shape[1], 3).numpy()
        )

    shown = {k: ends[k] for k in ("random init", "vox2vec", "ours")}
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    axes[0].imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=0.4, vmax=0.7)
    axes[0].set_title("image")
    for ax, (name, path) in zip(axes[1:], shown.items()):
        ax.imshow(features(load_fpn(path)).transpose(1, 0, 2), origin="lower")
        ax.set_title(f"{name}: PCA of features")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "feature_pca.png", dpi=110)
    plt.close(fig)
    names.append("feature_pca.png")

    # (e) pretraining losses
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, p in pretraining.items():
        steps_logged = [r["step"] for r in p["rows"]]
        axes[0].plot(
            steps_logged,
            [r["loss_contrastive"] / p["chance"] for r in p["rows"]],
            label=f"{name} L_c",
        )
        if any(r["loss_recon"] for r in p["rows"]):
            axes[1].plot(steps_logged, [r["loss_recon"] for r in p["rows"]], label=f"{name} L_r")
    axes[0].axhline(1.0, ls="--", c="gray")
    axes[0].set_title("InfoNCE L_c / chance ln(2N-1)")
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
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data", default="demo", help="the labelled set: 'demo' or a preprocess.py output folder"
    )
    p.add_argument(
        "--unlabelled",
        help="the pretraining corpus, kept apart from --data [the demo's, for --data demo]",
    )
    p.add_argument(
        "--preset",
        choices=["demo", "paper"],
        help="passed to every stage [each stage's own default]",
    )
    p.add_argument("--out", default="runs/evidence")
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 steps of everything: checks the pipeline, not the numbers",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="Table 1's rows on the demo (reuses the main run's pretrainings)",
    )
    p.add_argument(
        "--neighbours",
        action="store_true",
        help="Models Genesis, MIM, DenseCL and MedContext beside ours (reuses the main run's "
        "pretraining)",
    )
    p.add_argument("--no-figures", action="store_true")
    p.add_argument(
        "--force",
        action="store_true",
        help="use an --out that holds results of other data or --quick",
    )
    return runtime.parse(p, argv)


def run_protocol(args):
    return neighbours(args) if args.neighbours else ablation(args) if args.ablation else main(args)


if __name__ == "__main__":
    runtime.cli(run_protocol, parse_args)
