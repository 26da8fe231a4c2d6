"""finetune.py with two measurements of how fine-tuning goes (the evidence's convergence curves):
the test Dice every --eval-every steps, each on a copy of the model whose BatchNorm statistics are
re-estimated as after training (the run itself is unchanged: tests/experiments/test_lab.py), and
how far training moved each backbone level, ||w - w0|| / ||w0||. Writes OUT/curve.json beside
finetune.py's outputs; every finetune.py flag applies.

    python experiments/finetune_curve.py --data demo --split --train-cases 1 --checkpoint
    runs/pretrain-demo --eval-every 50 --out runs/ft-curve
"""

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: the stage files
import finetune  # noqa: E402
import runtime  # noqa: E402
from downstream import evaluate, fold_mean  # noqa: E402
from runtime import positive_int, world_info, write_json  # noqa: E402


def weight_change(model, initial):
    """Per backbone level, how far training moved the weights: ||w - w0|| / ||w0|| over the
    level's encoder and decoder parameters (level = the index in their names; stem: level 0)."""
    now = model.backbone.state_dict()
    sums = {}
    for name, w0 in initial.items():
        if not w0.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        parts = name.split(".")
        level = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0
        moved, size = sums.get(level, (0.0, 0.0))
        sums[level] = (
            moved + float((now[name].float() - w0.float()).pow(2).sum()),
            size + float(w0.float().pow(2).sum()),
        )
    return {
        str(level): (moved / size) ** 0.5 if size else None
        for level, (moved, size) in sorted(sums.items())
    }


def main(args):
    curves, moved = {}, {}

    def hooks(model, cfg, a, run, fold):
        initial = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
        _, train_ids, test_ids = next(p for p in run.plan if p[0] == fold)
        curve = curves.setdefault(str(fold), [])
        amp_dtype = runtime.amp_dtype(run.device, args.amp)

        def on_step(step, m):
            if (
                step % args.eval_every == 0 and world_info()[0] == 0
            ):  # the test Dice of a copy with precise BN
                twin = finetune.reestimate_batchnorm(
                    copy.deepcopy(m),
                    run.data_dir,
                    train_ids,
                    cfg,
                    run.device,
                    args.seed + 1000 + fold,
                )
                curve.append(
                    [
                        step,
                        fold_mean(
                            evaluate(
                                twin,
                                run.test_dir,
                                test_ids,
                                len(run.names),
                                cfg["eval_patch_size"],
                                run.device,
                                amp_dtype,
                            )
                        ),
                    ]
                )
            if step == cfg["steps"]:
                moved[str(fold)] = weight_change(m, initial)

        return dict(on_step=on_step)

    results = finetune.main(args, hooks, outputs=["curve.json"])
    if results is not None:
        write_json(Path(args.out) / "curve.json", dict(curve=curves, weight_change=moved))
    return results


def refusals(a):
    yield from finetune.refusals(a)
    if a.eval_every > a.steps:
        yield (f"--eval-every {a.eval_every} is past the end of the run (--steps {a.steps}): give "
               f"at most {a.steps}")


def parse_args(argv=None):
    p = finetune.build_parser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--eval-every",
        type=positive_int,
        required=True,
        help="record the test Dice every this many steps",
    )
    return runtime.parse(p, argv, finetune.preset, refusals)


if __name__ == "__main__":
    runtime.cli(main, parse_args)
