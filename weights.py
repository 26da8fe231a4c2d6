"""The project's weight files, and the authors', in one place: read with weights_only=True (a
file that would run code is refused), named for what they are when they are not what they
should be (a folder, empty, NIfTI, text, truncated, another of our kinds); nothing non-finite is
saved or loaded:

  backbone.pt        the FPN alone, its configuration and its pretraining config (pretrain.py)
  checkpoint.pt      everything a bit-equal --resume needs, as tensors and builtins (pretrain.py)
  model_fold<k>.pt   a fine-tuned network, what prediction needs, its test Dice (finetune.py)
  the authors'       vox2vec's and hierarchical-dense-ssl's released FPN3d weights (raw or Lightning
                     state dicts), read through the one key map between their names and ours
"""
import pickle
import re
from pathlib import Path

import torch

from data import InputError
from model import FPN3d, SegmentationModel
from runtime import Diverged, atomic

FORMAT_VERSION = 2   # of backbone.pt, checkpoint.pt and model_fold<k>.pt


def save_torch(obj, path, state):
    """obj written atomically to path, unless a tensor of its `state` is not finite (Diverged)."""
    bad = nonfinite(state)
    if bad:
        raise Diverged(f"{path}: not saved, {len(bad)} tensor(s) of the network are not finite "
                       f"(e.g. {bad[0]}); the run diverged (try a lower --lr)")
    with atomic(path) as tmp:
        torch.save(obj, tmp)


def nonfinite(state):
    """The names of a state dict's floating tensors that hold a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def what_file(path):
    """A few words on what a file that torch cannot read is."""
    path = Path(path)
    if path.is_dir():
        return "a folder, not a file"
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    head = path.open("rb").read(352)
    nifti = path.name.endswith((".nii", ".nii.gz")) or head[344:348] in (b"n+1\0", b"ni1\0")
    if nifti or head[:2] == b"\x1f\x8b":
        return "a NIfTI image (or another gzip file), not a checkpoint"
    try:
        head.decode("utf-8")
        return "a text file, not a checkpoint"
    except UnicodeDecodeError:
        return f"not a torch file ({size} bytes; truncated or of another format)"


def load_torch(path, what="checkpoint"):
    """torch.load on the CPU with weights_only=True; InputError naming the file and what it is for a
    missing file, one that is not a torch file, or one holding more than tensors and builtins (a
    pickle that could run code: refused, never retried without weights_only)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    torch_file = path.is_file() and path.open("rb").read(4).startswith((b"PK\x03\x04", b"\x80"))
    if not torch_file:       # a zip (torch.save) or a pickle (older torch): else say what it is
        raise InputError(f"{what} {path} could not be read safely: it is {what_file(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{what} {path} could not be read safely: it holds objects other than "
                         "tensors and plain data (code could run on loading), refused") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:    # torch's readers, a damaged file
        raise InputError(f"{what} {path} could not be read safely: a truncated or corrupt torch "
                         f"file ({type(e).__name__})") from None


def check_version(path, ckpt, kind, remedy):
    if ckpt.get("version") != FORMAT_VERSION:
        raise InputError(f"{path}: a {kind} of format version {ckpt.get('version')} (this code "
                         f"reads {FORMAT_VERSION}); {remedy}")


# ----------------------------------------------------------------------------- the authors' layout
# model.FPN3d computes the same function as the authors' FPN3d (vox2vec, hierarchical-dense-ssl),
# layer for layer; only the names differ (L = num_levels, k = L - 2 - l):
#     ours                                   theirs
#     stem.*                                 first_conv.*
#     encoder.{l}.{j}.body.{m}.*   (l < L-1) left_blocks.{l}.layers.{j}.layers.{m}.*
#     encoder.{L-1}.{j}.body.{m}.*           bottom_block.layers.{j}.layers.{m}.*
#     down.{l}.*                             down_blocks.{l}.1.*        (.0 is the max-pool)
#     lateral.{l}.*                          up_blocks.{k}.0.*          (.1 is the upsampling)
#     skip.{l}.*                             skip_blocks.{k}.*
#     decoder.{l}.{j}.body.{m}.*             right_blocks.{k}.layers.{j}.layers.{m}.*

def reference_key(key, num_levels):
    """Our FPN3d state-dict key -> the authors' key (the table above)."""
    top = num_levels - 1
    rules = [
        (r"stem\.(.+)", lambda m: f"first_conv.{m[1]}"),
        (r"encoder\.(\d+)\.(\d+)\.body\.(.+)", lambda m: (
            f"bottom_block.layers.{m[2]}.layers.{m[3]}" if int(m[1]) == top
            else f"left_blocks.{m[1]}.layers.{m[2]}.layers.{m[3]}")),
        (r"down\.(\d+)\.(.+)", lambda m: f"down_blocks.{m[1]}.1.{m[2]}"),
        (r"lateral\.(\d+)\.(.+)", lambda m: f"up_blocks.{top - 1 - int(m[1])}.0.{m[2]}"),
        (r"skip\.(\d+)\.(.+)", lambda m: f"skip_blocks.{top - 1 - int(m[1])}.{m[2]}"),
        (r"decoder\.(\d+)\.(\d+)\.body\.(.+)",
         lambda m: f"right_blocks.{top - 1 - int(m[1])}.layers.{m[2]}.layers.{m[3]}"),
    ]
    for pattern, replace in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return replace(m)
    raise KeyError(f"no reference name for {key!r}")


def key_map(config):
    """{our key: their key} for FPN3d(**config), built from the module itself (meta device)."""
    with torch.device("meta"):
        keys = FPN3d(**config).state_dict().keys()
    return {k: reference_key(k, config["num_levels"]) for k in keys}


def to_reference(state_dict, config):
    """Our FPN3d state dict -> the same tensors under the authors' names."""
    return {theirs: state_dict[ours] for ours, theirs in key_map(config).items()}


def from_reference(state_dict, config):
    """The authors' FPN3d state dict -> ours. KeyError if a key of either side is missing."""
    return {ours: state_dict[theirs] for ours, theirs in key_map(config).items()}


def layout_config(state_dict, stem, down):
    """(in_channels, base_channels, num_levels) of an FPN3d state dict, from its tensor shapes."""
    weight = state_dict[f"{stem}.weight"]                            # (C_0, C_in, 3, 3, 3)
    downs = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"{down}.")}
    return dict(in_channels=int(weight.shape[1]), base_channels=int(weight.shape[0]),
                num_levels=len(downs) + 1)


# ----------------------------------------------------------------------------- backbones

def read_backbone(path, verbose=True):
    """A backbone of any supported kind -> (backbone_config, our state dict, info). Accepted: our
    backbone.pt (or the pretrain.py run folder holding it); a raw state dict in the authors' layout
    or ours; a Lightning checkpoint, with or without the `backbone.` prefix (head keys are ignored
    and listed); any of these saved from DDP (`module.` prefix). InputError for anything else."""
    path = Path(path)
    path = path / "backbone.pt" if path.is_dir() and (path / "backbone.pt").is_file() else path
    ckpt = load_torch(path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise InputError(f"{path}: holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    if ckpt.get("kind") == "backbone":
        check_version(path, ckpt, "backbone.pt", "re-run pretrain.py")
        pretrained = ckpt.get("pretrain_config") or {}
        info = dict(kind="backbone.pt (pretrain.py)", step=ckpt.get("step"), arch=ckpt.get("arch"),
                    ignored=[], path=path, method=pretrained.get("method"),
                    preprocessing=pretrained.get("preprocessing"))
        config, state, layout = ckpt["backbone_config"], ckpt["state_dict"], "ours (model.FPN3d)"
    elif "kind" in ckpt or "model" in ckpt and "optimizer" in ckpt:
        what = "a fine-tuned model (finetune.py)" if ckpt.get("kind") == "segmenter" else \
            "a resumable checkpoint.pt"
        raise InputError(f"{path} is {what}, not a backbone file; pass a pretrain.py run folder or "
                         "its backbone.pt")
    else:
        lightning = isinstance(ckpt.get("state_dict"), dict)
        state = ckpt["state_dict"] if lightning else ckpt
        kind = "Lightning checkpoint" if lightning else "raw state_dict"
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{path}: not a state dict of tensors (keys {list(state)[:5]})")
        ignored = []
        for prefix, what in (("module.", "DDP `module.` prefix"),
                             ("backbone.", "`backbone.` prefix")):
            ours = [k for k in state if k.startswith(prefix)]
            if ours and (prefix == "backbone." or len(ours) == len(state)):
                ignored += sorted(k for k in state if not k.startswith(prefix))   # a model's heads
                state, kind = {k[len(prefix):]: state[k] for k in ours}, f"{kind}, {what}"
        if "first_conv.weight" in state:
            layout = "reference (vox2vec / hierarchical-dense-ssl FPN3d)"
            config = layout_config(state, "first_conv", "down_blocks")
            names = set(key_map(config).values())
        elif "stem.weight" in state:
            layout, config = "ours (model.FPN3d)", layout_config(state, "stem", "down")
            names = set(key_map(config))
        else:
            raise InputError(f"{path}: no FPN3d found (neither first_conv.weight nor stem.weight "
                             f"among keys {sorted(state)[:6]}...)")
        missing = sorted(names - set(state))
        if missing:
            raise InputError(f"{path}: {layout} with {config} but {len(missing)} key(s) missing, "
                             f"e.g. {missing[:4]}")
        info = dict(kind=f"{kind}, {layout}", step=None, arch=None, preprocessing=None, path=path,
                    ignored=sorted(ignored + [k for k in state if k not in names]))
        state = {k: v for k, v in state.items() if k in names}
        state = from_reference(state, config) if layout.startswith("reference") else state
    check_fits(path, layout, config, state)
    bad = nonfinite(state)
    if bad:
        raise InputError(f"{path}: {len(bad)} tensor(s) are not finite (e.g. {bad[0]}): a "
                         "diverged backbone")
    if verbose:
        step = f", method {info['method']}, step {info['step']}" if info["step"] is not None else ""
        ignored = "".join(f", {k}" for k in info["ignored"][:8])
        print(f"{path}: {info['kind']}{step}; FPN3d{tuple(config.values())} (in_channels, "
              f"base_channels, num_levels); ignored {len(info['ignored'])} key(s){ignored}")
    return config, state, info


def check_fits(path, layout, config, state):
    """InputError unless `state` (our names) has exactly FPN3d(**config)'s keys and shapes."""
    try:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in FPN3d(**config).state_dict().items()}
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {layout} with an unusable configuration {config} "
                         f"({e})") from None
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        raise InputError(f"{path}: {layout} with {config} but {len(missing)} key(s) missing (e.g. "
                         f"{missing[:3]}) and {len(extra)} unexpected (e.g. {extra[:3]})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in shapes.items()
             if state[k].shape != s]
    if wrong:
        raise InputError(f"{path}: {len(wrong)} tensor(s) do not fit FPN3d({config}), "
                         f"e.g. {wrong[:3]}")


def check_backbone_flags(args, config, source):
    """A backbone file decides the FPN (pretrain.py --init-from, --checkpoint downstream): a flag
    given on the command line that contradicts it is refused."""
    for k in ("base_channels", "num_levels"):
        if k in args.given and getattr(args, k) != config[k]:
            raise InputError(f"--{k.replace('_', '-')} {getattr(args, k)} contradicts {source} "
                             f"({config[k]})")
    if "arch" in args.given:
        raise InputError(f"--arch applies to --init random; {source} decides the architecture")


def expand_stem(state, in_channels, source):
    """A single-channel backbone's first convolution repeated over `in_channels` inputs and divided
    by in_channels (nnU-Net's start from nnssl's single-channel checkpoints): C copies of one image
    give the single-channel features. InputError for a backbone of another channel count."""
    stem = state["stem.weight"]                                      # (C_0, C_in, 3, 3, 3)
    if stem.shape[1] == in_channels:
        return state
    if stem.shape[1] != 1:
        raise InputError(f"{source}: a {stem.shape[1]}-channel backbone cannot start a "
                         f"{in_channels}-channel network")
    return {**state, "stem.weight": stem.repeat(1, in_channels, 1, 1, 1) / in_channels}


def save_backbone(path, model, cfg, step):
    """backbone.pt: the FPN alone with its configuration (what read_backbone reads)."""
    state = model.backbone.state_dict()
    save_torch(dict(version=FORMAT_VERSION, kind="backbone", step=step, state_dict=state,
                    backbone_config=dict(model.config["backbone_config"]), arch=cfg.get("arch"),
                    pretrain_config={k: list(v) if isinstance(v, tuple) else v
                                     for k, v in cfg.items()}),
               path, state)


# ----------------------------------------------------------------------------- fine-tuned models

def save_segmenter(path, model, **record):
    """model_fold<k>.pt: the network, its constructor arguments and `record` (classes,
    preprocessing, patch, augmentation, cases, Dice per test case)."""
    save_torch(dict(kind="segmenter", version=FORMAT_VERSION, model_config=model.config,
                    state_dict=model.state_dict(), **record), path, model.state_dict())


def load_segmenter(path):
    """A model written by finetune.py -> (SegmentationModel in eval mode, its file's dict)."""
    ckpt = load_torch(path, "model")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "segmenter":
        backbone = isinstance(ckpt, dict) and ckpt.get("kind") == "backbone"
        what = "a pretrained backbone (pretrain.py)" if backbone else "not a model from finetune.py"
        raise InputError(f"{path} is {what}, not a fine-tuned model: pass a finetune.py --out "
                         "folder or its model_fold<k>.pt")
    check_version(path, ckpt, "model", "re-run finetune.py")
    bad = nonfinite(ckpt["state_dict"])
    if bad:
        raise InputError(f"{path}: {len(bad)} tensor(s) are not finite (e.g. {bad[0]}): a diverged "
                         "model, it cannot predict; fine-tune it again")
    model = SegmentationModel(**ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


# ----------------------------------------------------------------------------- checkpoint.pt

def save_checkpoint(path, step, cfg, model, optimizer):
    """checkpoint.pt: everything a bit-equal --resume needs, as tensors and builtins only (the
    data draw their own seeded streams, so torch's random state is the only global one)."""
    rng = dict(torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    save_torch(dict(version=FORMAT_VERSION, step=step, config=cfg, model_config=model.config,
                    model=model.state_dict(), optimizer=optimizer.state_dict(), rng=rng),
               path, model.state_dict())


def load_checkpoint(path, model, optimizer):
    """--resume: model, optimizer and random states from checkpoint.pt -> the step to go on from."""
    if not Path(path).exists():
        raise InputError(f"--resume: no checkpoint at {path}")
    state = load_torch(path)
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise InputError(f"{path}: checkpoint version {version}, this code writes "
                         f"{FORMAT_VERSION}; start a new run folder")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]
