"""pretrain.py keeping backbones along the run, for a probe at several points of pretraining (the
evidence's probe curve): OUT/backbone_step<N>.pt at every --keep-steps N (0: the initialisation),
each loadable like backbone.pt. Every pretrain.py flag applies; the run itself is pretrain.py's.

    python experiments/pretrain_curve.py --data demo --out runs/curve --keep-steps 0 100 300 1000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: the stage files
import pretrain  # noqa: E402
import runtime  # noqa: E402
from runtime import non_negative_int  # noqa: E402
from weights import save_backbone  # noqa: E402


def main(args):
    """pretrain.py's main, with the initialisation kept before the first step and a backbone after
    every kept step (rank 0 writes)."""
    kept = [f"backbone_step{step}.pt" for step in args.keep_steps]
    run = pretrain.setup(args, outputs=pretrain.OUTPUTS + tuple(kept))

    def keep(model, cfg, step):
        if run.rank == 0 and step in args.keep_steps:
            save_backbone(run.folder / f"backbone_step{step}.pt", model, cfg, step)

    if run.start == 0:
        keep(run.model, run.cfg, 0)
    last = pretrain.train(run, after_step=keep)
    if run.rank == 0:
        runtime.finish_run(run.folder)
        print(
            f"done: {last} steps; backbones kept at steps {sorted(args.keep_steps)} in {run.folder}"
        )
    if run.world > 1:
        runtime.end_distributed()
    return run.folder


def refusals(a):
    yield from pretrain.refusals(a)
    late = [s for s in a.keep_steps if s > a.steps]
    if late:
        yield (
            f"--keep-steps {' '.join(map(str, late))}: past the end of the run (--steps "
            f"{a.steps}); give steps <= {a.steps}"
        )


def parse_args(argv=None):
    p = pretrain.build_parser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--keep-steps",
        type=non_negative_int,
        nargs="+",
        required=True,
        help="keep OUT/backbone_step<N>.pt at these steps (0: the initialisation)",
    )
    return runtime.parse(p, argv, pretrain.preset, refusals)


if __name__ == "__main__":
    runtime.cli(main, parse_args)
