"""The boundary every script shares, so that a stage file reads as its stage:

- its command line: checked flag types (a number of the wrong kind, sign or size exits 2 where it
  is parsed), the one preset step (`parse`: the paper's values are the defaults, a preset such as
  the demo's replaces some, the flags given beat both) and the rules a run cannot honour;
- its output folder, claimed as one unit (`claim_run`): one run at a time, an earlier run
  continued or replaced whole, never mixed with a new one, every file written atomically;
- its device, precision (bf16 where a measured probe finds it right) and memory; torchrun;
- the one wrapper around every script's main (`cli`). A refusal is a ValueError raised where the
  fact is known (a flag rule, the case reader in data.py, a weight file in weights.py, the run
  folder) and reported once, by `cli`: `script: error: <message>`, exit code 2.
"""
import argparse
import atexit
import hashlib
import json
import math
import os
import sys
import uuid
from pathlib import Path

import torch
import torch.distributed as dist


def cli(main, parse_args, interrupted="interrupted"):
    """Run `main(parse_args())` as a script: a ValueError or OSError (bad input, a full disk) is one
    line and exit 2, a non-finite loss (FloatingPointError) one line and exit 1, Ctrl-C one line
    and exit 1; main's return value, if an int, is the exit code."""
    name = Path(sys.argv[0]).name
    try:
        code = main(parse_args())
    except (ValueError, OSError, FloatingPointError) as e:
        # A DataLoader worker's error carries the worker's traceback in its text; its last line, the message.
        lines = [line for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        message = lines[-1].split(": ", 1)[-1] if len(lines) > 1 and lines[-1].startswith(type(e).__name__) else lines[-1]
        print(f"{name}: error: {message}", file=sys.stderr)
        sys.exit(1 if isinstance(e, FloatingPointError) else 2)
    except KeyboardInterrupt:
        sys.exit(f"{name}: {interrupted}")
    sys.exit(code if isinstance(code, int) else 0)


# ----------------------------------------------------------------------------- flags

def _checked(kind, ok, rule, name):
    """An argparse `type=`: a value of the wrong kind, not finite, or breaking `ok` exits 2 with
    "error: argument --x: <why>" before any work."""
    def check(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value:g}")
        return value
    check.__name__ = name
    return check


MAX_COUNT = 10 ** 9                                  # a count above this is a typo, and would be allocated
MAX_WORKERS = max(8, 4 * (os.cpu_count() or 1))      # processes: 4 per CPU core of this machine, at least 8
positive_int = _checked(int, lambda v: 1 <= v <= MAX_COUNT, ">= 1 and <= 1e9", "positive_int")
non_negative_int = _checked(int, lambda v: 0 <= v <= MAX_COUNT, ">= 0 and <= 1e9", "non_negative_int")
positive_float = _checked(float, lambda v: v > 0, "> 0 and finite", "positive_float")
non_negative_float = _checked(float, lambda v: v >= 0, ">= 0 and finite", "non_negative_float")
open_fraction = _checked(float, lambda v: 0 < v < 1, "in (0, 1)", "open_fraction")          # a probability
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]", "unit_interval")        # a weight
below_one = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)", "below_one")                # an EMA momentum, an overlap
axis = _checked(int, lambda v: v in (0, 1, 2), "0, 1 or 2 (X, Y, Z)", "axis")               # a volume axis
worker_count = _checked(int, lambda v: 0 <= v <= MAX_WORKERS, f"between 0 and {MAX_WORKERS}", "worker_count")
CHECKED_TYPES = (positive_int, non_negative_int, positive_float, non_negative_float, open_fraction, unit_interval,
                 below_one, axis, worker_count)
_UNSET = object()


def parse(parser, argv=None, preset=None, rules=()):
    """A script's command line in one step. The parser's defaults are the paper's values;
    preset(args) -> the values that replace some of them (the demo's, a method's); the flags given
    beat both (args.given names them). Then every rule(args) -> a message, or a false value, is
    asked: a run that cannot honour its flags is refused here, one line, exit 2."""
    args = parser.parse_args(argv)
    unset = argparse.Namespace(**dict.fromkeys(vars(args), _UNSET))    # what parsing leaves unset was not given
    args.given = sorted(k for k, v in vars(parser.parse_args(argv, unset)).items() if v is not _UNSET)
    if preset is not None:
        parser.set_defaults(**preset(args))
        args = parser.parse_args(argv, argparse.Namespace(given=args.given))
    for message in (rule(args) for rule in rules):
        if message:
            parser.error(message)
    return args


def is_demo(args):
    """--preset demo, or --data demo without --preset."""
    return args.preset == "demo" or (args.preset is None and args.data == "demo")


def changed_settings(saved, now, may_change=()):
    """['--flag old -> new', ...] for every setting of two configs that differs (lists and tuples
    compare equal), except those in may_change."""
    norm = lambda v: tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return [f"--{k.replace('_', '-')} {norm(saved.get(k))} -> {norm(now.get(k))}" for k in sorted(set(saved) | set(now))
            if k not in may_change and norm(saved.get(k)) != norm(now.get(k))]


# ----------------------------------------------------------------------------- the run folder, one unit

RECORD = ".run.json"    # in an output folder: the script, settings and files of the run that wrote it
_CLAIMED = {}           # resolved folder -> its record, for the folders this process claimed


def claim_run(folder, script, outputs=(), settings=None, force=False, resume=False, may_change=(), flag="--out"):
    """An output folder as one unit, for one run at a time; ValueError, one line, else.

    The folder is created and checked writable, then locked (`.lock` holds this process's pid; the
    lock of a pid that is gone, a run killed with -9, is taken over and said) and a killed run's
    temp files removed. The files an earlier run wrote there (those its record lists, and any
    matching `outputs`) are continued with `resume` when its settings equal `settings` (but
    may_change), removed, all of them and only them, with `force`, and refused otherwise. Every
    file this process then writes there (atomic_write, append_row) joins the record."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot create it ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {folder}: folder is not writable")
    _lock(folder, script)
    for stale in folder.glob(".tmp-*"):
        stale.unlink(missing_ok=True)
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    files = sorted({f for f in record.get("files", []) if (folder / f).exists()}
                   | {p.name for pattern in outputs for p in folder.glob(pattern)})
    shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    if files and record.get("script", script) != script:
        raise ValueError(f"{flag} {folder} holds a run of {record['script']} ({shown}): choose another folder "
                         "(--force replaces a run of this script only)")
    if files and not force:
        finished = record.get("finished") and all((folder / f).exists() for f in record.get("files", []))
        if not resume:
            raise ValueError(f"{flag} {folder} holds {'a finished' if finished else 'an unfinished'} "
                             f"run ({shown}): continue it with --resume, or pass --force to replace it")
        changed = changed_settings(record.get("settings") or {}, settings or {}, may_change)
        if changed or "settings" not in record:
            raise ValueError(f"{flag} {folder} holds a run with other settings ({'; '.join(changed) or 'none recorded'}):"
                             " continue it with the same ones, or pass --force to replace it")
    for name in files if force else ():
        (folder / name).unlink()
    _CLAIMED[folder.resolve()] = dict(script=script, settings=settings, files=[] if force else files, finished=False)
    _write_record(folder.resolve())
    return folder


def run_files(folder):
    """The files of the run this process claimed in `folder`: the earlier run's it continues, and its own."""
    return list(_CLAIMED[Path(folder).resolve()]["files"])


def finish_run(folder):
    """The run in `folder` is finished: said in its record; the folder is free again."""
    folder = Path(folder).resolve()
    if folder in _CLAIMED:
        _CLAIMED[folder]["finished"] = True
        _write_record(folder)
    _unlock(folder)


def _note(path):
    folder, name = Path(path).parent.resolve(), Path(path).name
    if folder in _CLAIMED and name not in _CLAIMED[folder]["files"]:
        _CLAIMED[folder]["files"].append(name)
        _write_record(folder)


def _write_record(folder):
    tmp = folder / f".tmp-{os.getpid()}-{RECORD}"
    tmp.write_text(json.dumps(_CLAIMED[folder], indent=1))
    os.replace(tmp, folder / RECORD)


def _lock(folder, script):
    lock = folder / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_pid(lock)
            if pid == os.getpid():
                return
            try:
                os.kill(pid, 0)                          # is the locking process still running?
                raise ValueError(f"{folder} is in use by another run (pid {pid}, {lock}): wait for it to end, "
                                 "or choose another output folder") from None
            except (ProcessLookupError, TypeError):      # gone, e.g. killed (TypeError: an unreadable lock)
                print(f"{script}: {lock}: a stale lock of pid {pid} (no longer running, e.g. killed); taking over",
                      file=sys.stderr)
                lock.unlink(missing_ok=True)
                continue
            except PermissionError:                      # running, as another user
                raise ValueError(f"{folder} is in use by another run (pid {pid}, {lock})") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(_unlock, folder)     # a refusal or a crash frees the folder too
        return
    raise ValueError(f"{lock}: could not be claimed (another run took it just now)")


def _unlock(folder):
    if _lock_pid(Path(folder) / ".lock") == os.getpid():
        (Path(folder) / ".lock").unlink(missing_ok=True)


def _lock_pid(lock):
    try:
        return int(Path(lock).read_text().strip())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- files

def atomic_write(path, write_fn):
    """write_fn(tmp_path) writes the file; it appears under `path` only once complete (a temp name
    unique per call, keeping the extension, in the same folder, then os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _note(path)
    return path


def save_json(path, obj):
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def append_row(path, row):
    """One JSON row appended to a log (log.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    _note(path)


def truncate_log(path, step):
    """Drop the rows of a log logged after `step` (a resumed run logs them again)."""
    if Path(path).exists():
        rows = [line for line in Path(path).read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))


def file_digest(*paths):
    """A short sha256 of files' bytes (a backbone, an ensemble's models): it changes when one is replaced."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- device, precision, memory

def pick_device(name="auto"):
    """--device: auto (CUDA if present), cpu, cuda, cuda:1, ...; ValueError for one not here."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def autocast_dtype(device, amp=True):
    """--amp: torch.bfloat16 where bf16 autocast is fast (a CUDA GPU, or a CPU with bf16 instructions,
    avx512_bf16 or AMX; elsewhere it is emulated and slower than fp32), else None (fp32)."""
    cpu_bf16 = any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if amp and (device.type == "cuda" or (device.type == "cpu" and cpu_bf16)) else None


_BF16_CONV_OK = {}      # (channels, X, Y, Z) -> whether this CPU's bf16 convolution gradient is right there


def bf16_conv_gradient_ok(channels, shape):
    """Measured once per shape and process: does a bf16 3x3x3 convolution on this CPU give the
    weight gradient fp32 gives (within 5%) for a (2, channels, *shape) input? Some CPUs' bf16
    kernels do not at some sizes (an AMD EPYC with torch 2.13: wherever X is 2)."""
    key = (min(channels, 32), *shape)
    if key not in _BF16_CONV_OK:
        state = torch.random.get_rng_state()             # the run's random stream is not touched
        torch.manual_seed(0)
        conv, x = torch.nn.Conv3d(key[0], key[0], 3, padding=1), torch.randn(2, *key)
        torch.random.set_rng_state(state)
        grads = []
        for dtype in (torch.bfloat16, None):
            conv.zero_grad()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                y = conv(x)
            y.float().square().sum().backward()
            grads.append(conv.weight.grad.clone())
        _BF16_CONV_OK[key] = bool((grads[0] - grads[1]).norm() <= 0.05 * grads[1].norm())
    return _BF16_CONV_OK[key]


def training_dtype(device, amp, channels, patch_size):
    """autocast_dtype for training an FPN of `channels` per level on `patch_size` patches: on the
    CPU, fp32 (with a note) where the probe finds a level whose bf16 convolution gradient is wrong."""
    dtype = autocast_dtype(device, amp)
    if dtype is None or device.type != "cpu":
        return dtype
    shapes = [tuple(min(8, math.ceil(p / 2 ** l)) if a else math.ceil(p / 2 ** l) for a, p in enumerate(patch_size))
              for l in range(len(channels))]
    wrong = [l for l, (c, s) in enumerate(zip(channels, shapes)) if not bf16_conv_gradient_ok(c, s)]
    if wrong:
        print(f"note: this CPU's bf16 convolution computes a wrong weight gradient at pyramid level {wrong[0]} "
              f"({'x'.join(map(str, shapes[wrong[0]]))} voxels, measured): training in fp32", file=sys.stderr)
        return None
    return dtype


def check_memory(needed, device, what):
    """ValueError, one line with the estimate and the machine's memory, when `needed` bytes cannot
    fit in the device's memory (a GPU's, or this machine's RAM)."""
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"the GPU's {torch.cuda.get_device_name(device)}"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"
    if needed > have:
        raise ValueError(f"{what} needs at least {needed / 2 ** 30:.1f} GiB, more than {where} {have / 2 ** 30:.1f} GiB "
                         "of memory: give smaller sizes")


def prepare_training(device):
    """Denormal floats flushed on the CPU (they slow CPU steps as activations shrink); cuDNN's
    autotuner on the GPU (fixed patch sizes)."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    torch.backends.cudnn.benchmark = True


# ----------------------------------------------------------------------------- torchrun

def setup_distributed(device_name="auto"):
    """Initialise torch.distributed when launched by torchrun. -> (rank, world, device)."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def world_info():
    """(rank, world size): (0, 1) unless launched by torchrun (setup_distributed)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def end_distributed():
    """Every process waits for rank 0's last writes, then the group is torn down."""
    if world_info()[1] > 1:
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(module, device):
    """DistributedDataParallel under torchrun, the module itself in one process."""
    if world_info()[1] == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0, differentiable: the backward sums the gradient over processes and
    keeps this process's rows (what a loss over the global batch needs)."""

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
    """All processes' embeddings, differentiably, so InfoNCE sees the global batch's negatives:
    each process pads its (N, D) rows to the static max_voxels (a pair can yield fewer voxels than
    asked) and marks the padding in `valid`, so no sizes are exchanged; DDP's averaging of parameter
    gradients then gives exactly the single-process gradient. -> (za, zb, valid) with
    (W * max_voxels, D) rows, or the inputs and None for one process."""
    if world_info()[1] == 1:
        return za, zb, None
    valid = torch.arange(max_voxels, device=za.device) < za.shape[0]                         # (max_voxels,)
    za, zb = (torch.nn.functional.pad(z, (0, 0, 0, max_voxels - za.shape[0])) for z in (za, zb))  # (max_voxels, D)
    return _GatherRows.apply(za), _GatherRows.apply(zb), _GatherRows.apply(valid.float()).bool()
