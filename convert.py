"""Released weights in, our weights out: the one key map between our FPN3d and the authors'.

model.FPN3d computes the same function as the FPN3d of vox2vec (Goncharov et al. 2023) and of
hierarchical-dense-ssl (Kats et al. 2024): the same layers, parameter counts (47,624,448 for
FPN3d(1, 16, 6), 47,567,872 for FPN3d(1, 32, 5)) and outputs on any input size; only the names
differ. `reference_key` is the map, applied in both directions:

    ours                                   theirs (L = num_levels, k = L - 2 - l)
    stem.*                                 first_conv.*
    encoder.{l}.{j}.body.{m}.*   (l < L-1) left_blocks.{l}.layers.{j}.layers.{m}.*
    encoder.{L-1}.{j}.body.{m}.*           bottom_block.layers.{j}.layers.{m}.*
    down.{l}.*                             down_blocks.{l}.1.*        (.0 is the max-pool)
    lateral.{l}.*                          up_blocks.{k}.0.*          (.1 is the upsampling)
    skip.{l}.*                             skip_blocks.{k}.*
    decoder.{l}.{j}.body.{m}.*             right_blocks.{k}.layers.{j}.layers.{m}.*

read_backbone_file accepts, and says which it found:
  - our backbone.pt (pretrain.py);
  - vox2vec's released backbone: a raw state_dict of their FPN3d, keys without prefix;
  - a vox2vec / hierarchical-dense-ssl Lightning checkpoint: ckpt["state_dict"] with `backbone.`
    (and head) prefixes, or with the backbone prefix already stripped;
  - any of these saved from DistributedDataParallel (a `module.` prefix).
The architecture is read from the tensor shapes; keys of heads are ignored and listed.

    python convert.py --inspect FILE                  # what the file is, and its architecture
    python convert.py --export-reference backbone.pt fpn_reference.pt   # ours -> their layout
Nothing is downloaded: get the authors' files by hand (README, "Use the authors' weights").
"""
import argparse
import re
import sys
from pathlib import Path

import torch

from model import FPN3d
from runtime import load_torch, save_torch

BACKBONE_VERSION = 2  # backbone.pt / checkpoint.pt format; 2: FPN3d equal to the reference (skip convs, block biases)


def reference_key(key, num_levels):
    """Our FPN3d state-dict key -> the reference's key (the table in the module docstring)."""
    top = num_levels - 1
    rules = [
        (r"stem\.(.+)", lambda m: f"first_conv.{m[1]}"),
        (r"encoder\.(\d+)\.(\d+)\.body\.(.+)", lambda m: (
            f"bottom_block.layers.{m[2]}.layers.{m[3]}" if int(m[1]) == top
            else f"left_blocks.{m[1]}.layers.{m[2]}.layers.{m[3]}")),
        (r"down\.(\d+)\.(.+)", lambda m: f"down_blocks.{m[1]}.1.{m[2]}"),
        (r"lateral\.(\d+)\.(.+)", lambda m: f"up_blocks.{top - 1 - int(m[1])}.0.{m[2]}"),
        (r"skip\.(\d+)\.(.+)", lambda m: f"skip_blocks.{top - 1 - int(m[1])}.{m[2]}"),
        (r"decoder\.(\d+)\.(\d+)\.body\.(.+)", lambda m: f"right_blocks.{top - 1 - int(m[1])}.layers.{m[2]}.layers.{m[3]}"),
    ]
    for pattern, replace in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return replace(m)
    raise KeyError(f"convert.py: no reference name for {key!r}")


def key_map(config):
    """{our key: their key} for FPN3d(**config), built from the module itself (meta device)."""
    with torch.device("meta"):
        keys = FPN3d(**config).state_dict().keys()
    return {k: reference_key(k, config["num_levels"]) for k in keys}


def to_reference(state_dict, config):
    """Our FPN3d state dict -> the same tensors under the reference's names."""
    return {theirs: state_dict[ours] for ours, theirs in key_map(config).items()}


def from_reference(state_dict, config):
    """The reference's FPN3d state dict -> ours. KeyError if a key of either side is missing."""
    return {ours: state_dict[theirs] for ours, theirs in key_map(config).items()}


def reference_config(state_dict):
    """Architecture of a reference-layout state dict, from its tensor shapes."""
    weight = state_dict["first_conv.weight"]                         # (C_0, C_in, 3, 3, 3)
    downs = {int(k.split(".")[1]) for k in state_dict if k.startswith("down_blocks.")}
    return dict(in_channels=int(weight.shape[1]), base_channels=int(weight.shape[0]), num_levels=len(downs) + 1)


def our_config(state_dict):
    weight = state_dict["stem.weight"]
    downs = {int(k.split(".")[1]) for k in state_dict if k.startswith("down.")}
    return dict(in_channels=int(weight.shape[1]), base_channels=int(weight.shape[0]), num_levels=len(downs) + 1)


def _strip(state_dict, prefix):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_backbone_file(path, verbose=True):
    """Any supported file -> (backbone_config, our state dict, info dict). ValueError, one line
    naming the file and what does not fit, for anything else."""
    path = Path(path)
    ckpt = load_torch(path, "checkpoint")      # a pickle with code in it, a truncated file: one line
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    if ckpt.get("kind") == "backbone":
        if ckpt.get("version") != BACKBONE_VERSION:
            raise ValueError(f"{path}: a backbone.pt of format version {ckpt.get('version')} (this code reads "
                             f"{BACKBONE_VERSION}; version 2 made FPN3d equal to the reference's); re-run pretrain.py")
        info = dict(kind="backbone.pt (pretrain.py)", step=ckpt.get("step"), arch=ckpt.get("arch"), ignored=[],
                    method=(ckpt.get("pretrain_config") or {}).get("method", "ours"))
        config, state = ckpt["backbone_config"], ckpt["state_dict"]
        check_fits(path, "ours (model.FPN3d)", config, state)
        if verbose:
            print(f"{path}: {info['kind']}, method {info['method']}, step {info['step']}; FPN3d{tuple(config.values())} "
                  "(in_channels, base_channels, num_levels)")
        return config, state, info
    if "kind" in ckpt or "model" in ckpt and "optimizer" in ckpt:
        raise ValueError(f"{path} is not a backbone file (kind: {ckpt.get('kind', 'a resumable checkpoint.pt')}); "
                         "pass RUN_DIR/backbone.pt")
    state, kind = (ckpt["state_dict"], "Lightning checkpoint") if isinstance(ckpt.get("state_dict"), dict) \
        else (ckpt, "raw state_dict")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (keys {list(state)[:5]})")
    if all(k.startswith("module.") for k in state):
        state, kind = _strip(state, "module."), kind + ", DDP `module.` prefix"
    ignored = []
    if any(k.startswith("backbone.") for k in state):
        ignored = sorted(k for k in state if not k.startswith("backbone."))
        state, kind = _strip(state, "backbone."), kind + ", `backbone.` prefix"
    if "first_conv.weight" in state:
        layout, config = "reference (vox2vec / hierarchical-dense-ssl FPN3d)", reference_config(state)
        names = set(key_map(config).values())
    elif "stem.weight" in state:
        layout, config = "ours (model.FPN3d)", our_config(state)
        names = set(key_map(config))
    else:
        raise ValueError(f"{path}: no FPN3d found (neither first_conv.weight nor stem.weight among keys "
                         f"{sorted(state)[:6]}...)")
    ignored += sorted(k for k in state if k not in names)       # heads without a prefix
    missing = sorted(names - set(state))
    if missing:
        raise ValueError(f"{path}: {layout} with {config} but {len(missing)} key(s) missing, e.g. {missing[:4]}")
    state = {k: v for k, v in state.items() if k in names}
    if layout.startswith("reference"):
        state = from_reference(state, config)
    check_fits(path, layout, config, state)
    info = dict(kind=f"{kind}, {layout}", step=None, arch=None, ignored=ignored)
    if verbose:
        print(f"{path}: {info['kind']}; FPN3d{tuple(config.values())} "
              f"(in_channels, base_channels, num_levels); ignored {len(ignored)} key(s)"
              + (f": {', '.join(ignored[:8])}{' ...' if len(ignored) > 8 else ''}" if ignored else ""))
    return config, state, info


def check_fits(path, layout, config, state):
    """ValueError, one line, unless `state` (our names) has exactly FPN3d(**config)'s keys and shapes."""
    try:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in FPN3d(**config).state_dict().items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {layout} with an unusable configuration {config} ({e})") from None
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        raise ValueError(f"{path}: {layout} with {config} but {len(missing)} key(s) missing (e.g. {missing[:3]}) "
                         f"and {len(extra)} unexpected (e.g. {extra[:3]})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in shapes.items() if state[k].shape != s]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensor(s) do not fit FPN3d({config}), e.g. {wrong[:3]}")


def check_export_target(src, dst, force):
    """--export-reference writes a new file: never over its input, nor over an existing file
    (a run's backbone.pt, say) unless --force."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"--export-reference: the output {dst} is the input itself; choose another file name")
    if dst.exists() and not force:
        raise ValueError(f"--export-reference: {dst} exists; choose another file name or pass --force")
    if not dst.parent.is_dir():
        raise ValueError(f"--export-reference: folder {dst.parent} does not exist")


def main(args):
    try:
        if args.inspect:
            read_backbone_file(args.inspect)
        else:
            src, dst = args.export_reference
            check_export_target(src, dst, args.force)
            config, state, info = read_backbone_file(src)
            save_torch(to_reference(state, config), dst)
            print(f"wrote {dst}: FPN3d({', '.join(f'{k}={v}' for k, v in config.items())}) in the reference's "
                  "layout, a raw state_dict: their FPN3d(in_channels, base_channels, num_scales).load_state_dict() takes it")
    except ValueError as e:
        sys.exit(f"convert.py: error: {e}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--inspect", metavar="FILE", help="say what FILE holds")
    g.add_argument("--export-reference", nargs=2, metavar=("OURS", "OUT"), help="write OURS's backbone in the reference layout")
    p.add_argument("--force", action="store_true", help="--export-reference may replace an existing OUT (never OURS)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
