"""What every stage needs from the machine and the command line, in one place: files written
atomically, checkpoints read without unpickling code, output folders that are never overwritten
by accident, the device and its precision, torchrun, presets and checked flag types.

- atomic_write / save_json / save_torch: a file appears under its name only once complete (a
  temp file with a unique name in the same folder, then os.replace);
- load_torch: torch.load(weights_only=True), so a crafted pickle cannot run code; a file that is
  not a torch file is named for what it is (a folder, empty, a NIfTI image, text);
- make_output_dir / claim_folder / refuse_finished: an output folder is created and writable,
  used by one run at a time (a lock file holding the pid), and a finished result in it is
  replaced only with --force;
- pick_device / autocast_dtype / setup_distributed / wrap_ddp: --device, --amp and torchrun;
- parse_with_presets: the paper's values as argparse defaults, a preset (the demo's) on top,
  the flags given on top of both;
- changed_settings / data_fingerprint / rng_state: what --resume compares and restores;
- argparse types (positive_int, ...): a bad number exits 2 where it is parsed.
"""
import argparse
import atexit
import hashlib
import json
import math
import os
import pickle
import sys
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_VERSION = 2   # the format of backbone.pt, checkpoint.pt and model_fold<k>.pt


# ----------------------------------------------------------------------------- files

def atomic_write(path, write_fn):
    """write_fn(tmp_path) writes the file; it appears under `path` only once complete. The temp
    name keeps the extension (nibabel and numpy read it) and is unique per call."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_json(path, obj, indent=2):
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent)))


def save_torch(obj, path):
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def what_file(path):
    """A few words on what a file that torch cannot read is (for the one-line error)."""
    path = Path(path)
    if path.is_dir():
        return "a folder, not a file"
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    head = path.open("rb").read(352)
    if path.name.endswith((".nii", ".nii.gz")) or head[:2] == b"\x1f\x8b" or head[344:348] in (b"n+1\0", b"ni1\0"):
        return "a NIfTI image (or another gzip file), not a checkpoint"
    try:
        head.decode("utf-8")
        return "a text file, not a checkpoint"
    except UnicodeDecodeError:
        return f"not a torch file ({size} bytes; truncated or of another format)"


def load_torch(path, what="checkpoint"):
    """torch.load on the CPU with weights_only=True. ValueError, one line naming the file and what
    it is, for a missing file, one that is not a torch file, or one that holds more than tensors
    and builtins (a pickle that could run code: refused, never retried without weights_only)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    if path.is_dir() or path.stat().st_size == 0:
        raise ValueError(f"{what} {path} could not be read: it is {what_file(path)}")
    head = path.open("rb").read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):       # torch's zip format, or a raw pickle
        raise ValueError(f"{what} {path} could not be read safely: it is {what_file(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{what} {path} could not be read safely: it holds objects other than tensors and plain "
                         "data (code could run on loading), refused") from None
    except Exception as e:
        raise ValueError(f"{what} {path} could not be read safely: a truncated or corrupt torch file "
                         f"({type(e).__name__})") from None


def make_output_dir(path, flag="--out"):
    """Create the output folder (and parents); ValueError, one line, if it cannot be created or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: folder is not writable")
    return path


def refuse_finished(folder, outputs, force=False, flag="--out", what="finished result", hint="pass --force to replace it"):
    """No finished result is replaced by accident: ValueError, one line, when `folder` already
    holds one of `outputs` (file names or glob patterns) and not `force`."""
    found = sorted({p.name for pattern in outputs for p in Path(folder).glob(pattern)})
    if found and not force:
        raise ValueError(f"{flag} {folder} already holds a {what} ({', '.join(found)}): choose another {flag}, or {hint}")


def claim_output(folder, script, outputs=(), force=False, flag="--out", what="finished result",
                 hint="pass --force to replace it"):
    """An output folder for one run: created and writable, claimed (claim_folder), and holding no
    finished result among `outputs` unless force (refuse_finished). ValueError, one line."""
    make_output_dir(folder, flag)
    claim_folder(folder, script)
    refuse_finished(folder, outputs, force, flag, what, hint)


def claim_folder(path, script):
    """One run per folder: PATH/.lock, created with O_EXCL, holds this process's pid. A second run
    into the folder is refused (ValueError, one line); a lock whose pid is no longer running (a run
    killed with -9) is stale, taken over, and said. Released at exit (or by release_folder)."""
    lock = Path(path) / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_pid(lock)
            if pid == os.getpid():          # this process claimed it already (an earlier call)
                return lock
            if pid is not None and _running(pid):
                raise ValueError(f"{path} is in use by another run (pid {pid}, {lock}): wait for it to end, "
                                 "or choose another output folder") from None
            print(f"{script}: {lock}: a stale lock of pid {pid} (no longer running, e.g. killed); taking over",
                  file=sys.stderr)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(release_folder, path)
        return lock
    raise ValueError(f"{lock}: could not be claimed (another run took it just now)")


def release_folder(path):
    lock = Path(path) / ".lock"
    if _lock_pid(lock) == os.getpid():
        lock.unlink(missing_ok=True)


def _lock_pid(lock):
    try:
        return int(Path(lock).read_text().strip())
    except (OSError, ValueError):
        return None


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- devices, precision and torchrun

def pick_device(name="auto"):
    """--device: auto (CUDA if present), cpu, cuda, cuda:1, ...; ValueError for one not here."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def cpu_has_bf16():
    """Whether this CPU has bf16 instructions (avx512_bf16 or AMX), where bf16 autocast makes 3-D
    convolutions faster; elsewhere bf16 is emulated and slower than fp32."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def autocast_dtype(device, amp=True):
    """--amp: torch.bfloat16 where bf16 autocast is fast (a CUDA GPU, or a CPU with bf16
    instructions), else None (fp32). --no-amp: always None."""
    if not amp:
        return None
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
        return torch.bfloat16
    return None


def training_autocast_dtype(device, amp, patch_size, num_levels):
    """autocast_dtype for training on `patch_size` patches through an FPN of `num_levels`. On the
    CPU, torch's bf16 3x3x3 convolution returns a wrong weight gradient when the first spatial
    size is exactly 2 (seen with torch 2.13; tests/test_pretrain.py scans for it), so a patch that
    puts a pyramid level at 2 voxels along X trains in fp32 there, with a note."""
    dtype = autocast_dtype(device, amp)
    sizes = [math.ceil(patch_size[0] / 2 ** l) for l in range(num_levels)]
    if dtype is not None and device.type == "cpu" and 2 in sizes:
        print(f"note: --patch-size X = {patch_size[0]} puts a pyramid level at 2 voxels along X, where torch's CPU bf16 "
              "convolution computes a wrong weight gradient: training in fp32 (another X avoids it)", file=sys.stderr)
        return None
    return dtype


def prepare_training(device):
    """Settings every training loop wants: denormal floats flushed on the CPU (they slow CPU steps
    as activations shrink), cuDNN's autotuner on the GPU (fixed patch sizes)."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    torch.backends.cudnn.benchmark = True


def setup_distributed(device_name="auto"):
    """Initialise torch.distributed when launched by torchrun. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def world_info():
    """(rank, world size): (0, 1) unless launched by torchrun (setup_distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap_ddp(module, device):
    """DistributedDataParallel under torchrun, the module itself in one process."""
    if world_info()[1] == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def gather_rows(x):
    """all_gather along dim 0, differentiable: the backward sums the gradient over processes and
    keeps this process's rows (what a loss over the global batch needs)."""
    return _GatherRows.apply(x)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_embeddings(za, zb, max_voxels):
    """All processes' embeddings, differentiably, so InfoNCE sees the global batch's negatives.

    Each process pads its (N, D) rows to the static max_voxels (a pair can yield fewer voxels
    than asked, data.sample_pair) and marks the padding in `valid`, so no sizes are exchanged.
    Backward: the gathered copy's gradient is summed over processes and each keeps its chunk;
    DDP's averaging of parameter gradients then gives exactly the single-process gradient.
    Returns (za, zb, valid) with (W * max_voxels, D) rows, or the inputs and None for one process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return za, zb, None
    pad = max_voxels - za.shape[0]
    valid = torch.arange(max_voxels, device=za.device) < za.shape[0]          # (max_voxels,)
    za, zb = (torch.nn.functional.pad(z, (0, 0, 0, pad)) for z in (za, zb))  # (max_voxels, D)
    return gather_rows(za), gather_rows(zb), gather_rows(valid.float()).bool()


def unwrap(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------- presets and --resume

def explicit_flags(parser, argv):
    """The destinations of the flags given on the command line, not taken from a default (the
    parser must not allow abbreviations)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return sorted({a.dest for a in parser._actions for token in argv
                   if token in a.option_strings or any(token.startswith(o + "=") for o in a.option_strings)})


def is_demo(args):
    """--preset demo, or no --preset and --data demo / demo-unlabelled."""
    return args.preset == "demo" or (args.preset is None and args.data in ("demo", "demo-unlabelled"))


def parse_with_presets(parser, argv, presets):
    """The paper's values are the parser's defaults; presets(first parse, explicit flags) -> the
    defaults that replace some of them (the demo preset, a method's); the flags given override
    both. -> args, with args.explicit: the flags given on the command line."""
    explicit = explicit_flags(parser, argv)
    parser.set_defaults(**presets(parser.parse_args(argv), explicit))
    args = parser.parse_args(argv)
    args.explicit = explicit
    return args


def changed_settings(saved, now, may_change=()):
    """['--flag old -> new', ...] for every setting of two configs that differs (lists and tuples
    compare equal), except those in may_change."""
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
    return [f"--{k.replace('_', '-')} {norm(saved.get(k))} -> {norm(now.get(k))}" for k in sorted(set(saved) | set(now))
            if k not in may_change and norm(saved.get(k)) != norm(now.get(k))]


def read_checkpoint(path, cfg, may_change=()):
    """--resume: a checkpoint.pt read safely -> its dict. ValueError, one line, for a missing or
    unreadable file, another format version, or a saved config that differs from `cfg` in any
    setting but may_change (the list of what changed)."""
    if not Path(path).exists():
        raise ValueError(f"--resume: no checkpoint at {path}")
    try:
        state = load_torch(path)
    except ValueError as e:
        raise ValueError(f"{path}: not a checkpoint this code can read safely ({str(e).split(': ', 1)[-1]})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise ValueError(f"{path}: checkpoint version {version}, this code writes {CHECKPOINT_VERSION}; start a new run folder")
    changed = changed_settings(state["config"], cfg, may_change)
    if changed:
        raise ValueError(f"{path}: --resume with settings that differ from the saved run ({'; '.join(changed)}); "
                         "resume with the same flags, or start a new --out")
    return state


def save_training_state(path, step, cfg, args, model, optimizer):
    """checkpoint.pt: everything a bit-equal --resume needs, as tensors and builtins only."""
    core = unwrap(model)
    save_torch(dict(version=CHECKPOINT_VERSION, step=step, config=cfg, args=args, model_config=core.config,
                    model=core.state_dict(), optimizer=optimizer.state_dict(), rng=rng_state()), path)


def resume_training(path, model, optimizer, cfg, may_change=()):
    """--resume: model, optimizer and random states from `path` (read_checkpoint's checks) -> the
    step to continue from."""
    state = read_checkpoint(path, cfg, may_change)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state["step"]


def stop_non_finite(checkpoint, first, last, script):
    """Stop every process on a non-finite loss, rank 0 naming the last good checkpoint."""
    if world_info()[0] == 0:
        where = f"the last good checkpoint is {checkpoint}" if Path(checkpoint).exists() else "no checkpoint was written yet"
        print(f"{script}: non-finite loss between steps {first} and {last}; stopping. {where} (try a lower --lr).",
              file=sys.stderr)
    sys.exit(1)


def append_row(path, row):
    """One JSON row appended to a log (log.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(path, step):
    """Drop the rows of a log logged after `step` (a resumed run logs them again)."""
    if Path(path).exists():
        rows = [line for line in Path(path).read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))


def rng_state():
    """torch's, numpy's global and CUDA's random states as tensors and builtins (weights_only
    loads them, unlike numpy's tuple), for a bit-equal --resume."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), gauss=float(gauss)))


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_fingerprint(data_dir):
    """A short hash of a preprocessed folder's dataset.json and every case's meta.json: it changes
    when a case is added, removed or preprocessed again."""
    digest = hashlib.sha256((Path(data_dir) / "dataset.json").read_bytes())
    for meta in sorted(Path(data_dir).glob("cases/*/meta.json")):
        digest.update(meta.read_bytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- flag types
# argparse `type=` functions: a bad value exits 2 with "error: argument --x: <why>" before any
# work. Every script's numeric flags use these (tests/test_cli.py checks that they all do).

def _number(kind, text):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _checked(kind, ok, rule, name):
    def check(text):
        value = _number(kind, text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value:g}")
        return value
    check.__name__ = name
    check.rule = rule
    return check


positive_int = _checked(int, lambda v: v >= 1, ">= 1", "positive_int")
non_negative_int = _checked(int, lambda v: v >= 0, ">= 0", "non_negative_int")
positive_float = _checked(float, lambda v: v > 0, "> 0", "positive_float")
non_negative_float = _checked(float, lambda v: v >= 0, ">= 0", "non_negative_float")
open_fraction = _checked(float, lambda v: 0 < v < 1, "in (0, 1)", "open_fraction")          # a probability
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]", "unit_interval")        # a weight
momentum = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)", "momentum")                  # an EMA momentum, an overlap
axis = _checked(int, lambda v: v in (0, 1, 2), "0, 1 or 2 (X, Y, Z)", "axis")               # a volume axis
CHECKED_TYPES = (positive_int, non_negative_int, positive_float, non_negative_float, open_fraction, unit_interval,
                 momentum, axis)
