"""Say what a weight file is, or write our backbone in the authors' layout.

    python experiments/convert.py --inspect FILE                        # what the file is, its FPN
    python experiments/convert.py --export-reference runs/pretrain-demo/backbone.pt fpn_reference.pt

The stages read the authors' released files directly (`--checkpoint` / `--init-from` take our
backbone.pt, a raw state dict in their layout or ours, a Lightning checkpoint with or without the
`backbone.` prefix, any of these from DDP): weights.read_backbone, through the one key map
between their FPN3d's names and ours (weights.py lists it). This tool only reports and exports.
--export-reference writes a raw state dict that their `FPN3d(...).load_state_dict` takes.
Nothing is downloaded: get the authors' files by hand (README, "Use the authors' weights").
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: the stage files
import runtime  # noqa: E402
from data import InputError  # noqa: E402
from weights import read_backbone, save_torch, to_reference  # noqa: E402


def check_export_target(dst):
    """--export-reference writes a new file: never over an existing one (its input, a run's
    backbone.pt, a file of the user's)."""
    dst = Path(dst)
    if dst.exists():
        raise InputError(
            f"--export-reference: {dst} exists; choose another file name (nothing is overwritten)"
        )
    if not dst.parent.is_dir():
        raise InputError(f"--export-reference: folder {dst.parent} does not exist")


def main(args):
    if args.inspect:
        read_backbone(args.inspect)
        return
    src, dst = args.export_reference
    check_export_target(dst)
    config, state, info = read_backbone(src)
    save_torch(to_reference(state, config), dst, state)
    print(
        f"wrote {dst}: FPN3d({', '.join(f'{k}={v}' for k, v in config.items())}) in the "
        "reference's layout, a raw state_dict: their FPN3d(in_channels, base_channels, "
        "num_scales).load_state_dict() takes it"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--inspect", metavar="FILE", help="say what FILE holds")
    g.add_argument(
        "--export-reference",
        nargs=2,
        metavar=("OURS", "OUT"),
        help="write OURS's backbone in the reference layout",
    )
    return runtime.parse(p, argv)


if __name__ == "__main__":
    runtime.cli(main, parse_args)
