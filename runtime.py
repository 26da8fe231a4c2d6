"""The boundary every script shares, so that a stage file reads as its stage: the one wrapper
around every main (cli: bad input is one line, a bug keeps its traceback), the command line
(checked flag types; parse: paper defaults, a preset, the flags given, the refusals), the run
folder and its record (claim_run), the device, its precision and memory, and torchrun.
"""
import argparse
import atexit
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from data import InputError


class Diverged(InputError):
    """A training loss (or weights) not finite: the run stops without saving, exit 1."""


def cli(main, parse_args, interrupted="interrupted"):
    """Run main(parse_args()) as a script: InputError -> one line, exit 2; Diverged and Ctrl-C ->
    one line, exit 1; any other exception -> its traceback. An int from main is the exit code."""
    name = Path(sys.argv[0]).name
    try:
        code = main(parse_args())
    except InputError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, Diverged) else 2)
    except KeyboardInterrupt:
        sys.exit(f"{name}: {interrupted}")
    sys.exit(code if isinstance(code, int) else 0)


# ----------------------------------------------------------------------------- the command line

class Checked(NamedTuple):
    """An argparse `type=`: a value of the wrong kind, or outside [low, high] (NaN and inf too),
    exits 2 where it is parsed, "argument --x: must be <rule>, got <value>"."""
    kind: Callable
    low: float
    high: float
    rule: str

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            noun = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
        if not self.low <= value <= self.high:
            raise argparse.ArgumentTypeError(f"must be {self.rule}, got {value:g}")
        return value


MAX_COUNT = 10 ** 9                 # a count above this is a typo, and would be allocated
MAX_WORKERS = max(8, 4 * (os.cpu_count() or 1))      # processes: 4 per core, at least 8
BIG, TINY = sys.float_info.max, sys.float_info.min  # the largest finite, the smallest normal > 0
BELOW_ONE = math.nextafter(1.0, 0.0)                 # the largest float < 1
positive_int = Checked(int, 1, MAX_COUNT, ">= 1 and <= 1e9")
non_negative_int = Checked(int, 0, MAX_COUNT, ">= 0 and <= 1e9")
positive_float = Checked(float, TINY, BIG, "> 0 and finite")
non_negative_float = Checked(float, 0.0, BIG, ">= 0 and finite")
open_fraction = Checked(float, TINY, BELOW_ONE, "in (0, 1)")       # a probability
unit_interval = Checked(float, 0.0, 1.0, "in [0, 1]")               # a weight
below_one = Checked(float, 0.0, BELOW_ONE, "in [0, 1)")           # an overlap, a momentum
axis = Checked(int, 0, 2, "0, 1 or 2 (X, Y, Z)")                    # a volume axis
worker_count = Checked(int, 0, MAX_WORKERS, f"between 0 and {MAX_WORKERS}")
CHECKED_TYPES = (positive_int, non_negative_int, positive_float, non_negative_float,
                 open_fraction, unit_interval, below_one, axis, worker_count)
UNSET = object()


def parse(parser, argv=None, preset=None, refusals=None):
    """A command line, parsed once. The parser's defaults are the paper's values; preset(args)
    -> a preset's values (the demo's, a method's) that replace some; the flags given beat both
    (args.given names them). refusals(args) yields what a run cannot honour: refused, exit 2."""
    defaults = {a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}
    defaults.update(parser._defaults)           # set_defaults' values of no flag (a method's name)
    given = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(defaults, UNSET))))
    given = {k: v for k, v in given.items() if v is not UNSET}
    args = argparse.Namespace(**{**defaults, **given}, given=sorted(given))
    vars(args).update({k: v for k, v in (preset(args) if preset else {}).items() if k not in given})
    for message in filter(None, refusals(args) if refusals else ()):
        parser.error(message)
    return args


def is_demo(args):
    """--preset demo, or --data demo without --preset."""
    return args.preset == "demo" or (args.preset is None and args.data == "demo")


HOW_TO_RUN = ("out", "resume", "force", "workers", "device", "amp", "compile", "preset", "given")


def settings(args):
    """What a --resume must find unchanged: every flag but HOW_TO_RUN's; lists as JSON has them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
            if k not in HOW_TO_RUN}


def changed(saved, now, may_change=()):
    """The keys of two dicts whose values differ, but those of may_change."""
    keys = sorted(set(saved) | set(now))
    return [k for k in keys if k not in may_change and saved.get(k) != now.get(k)]


# ----------------------------------------------------------------------------- the run folder

RECORD = ".run.json"     # in an output folder: the run that writes there (claim_run)


def claim_run(folder, script, outputs, settings, inputs=None, force=False, resume=False,
              may_change=(), flag="--out"):
    """An output folder for one run of `script` that writes `outputs` (names in the folder),
    locked until finish_run. An earlier run its record names is continued, replaced or refused
    (decide); a file no record lists is never removed, and one holding a name of `outputs` is
    refused. -> the earlier run's files a continued run keeps."""
    folder = Path(folder)
    make_folder(folder, flag)
    lock(folder, script)
    record = read_json(folder / RECORD) or {}
    earlier = [f for f in record.get("files", []) if (folder / f).exists()]
    if earlier:
        decide(folder, record, earlier, script, settings, inputs, force, resume, may_change, flag)
    kept = [] if force else earlier
    foreign = [f for f in outputs if (folder / f).exists() and f not in kept]
    if foreign:
        raise InputError(f"{flag} {folder}: {foreign[0]} is there and no run's record lists it: "
                         "move it, or choose another folder (a run replaces only its own files)")
    files = sorted(set(kept) | set(outputs))
    for name in set(files) | set(record.get("files", [])):     # a killed run's temp files
        (folder / name).with_name(f".tmp.{Path(name).name}").unlink(missing_ok=True)
    write_json(folder / RECORD, dict(script=script, settings=settings, inputs=inputs, files=files,
                                     finished=False))
    return kept


def decide(folder, record, files, script, settings, inputs, force, resume, may_change, flag):
    """An earlier run's files are there: refused unless the run is this script's and --force
    (they are removed) or --resume with the same settings (but may_change) and inputs."""
    shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    if record.get("script") != script:
        raise InputError(f"{flag} {folder} holds a run of {record.get('script')} ({shown}): "
                         "choose another folder (--force replaces a run of this script only)")
    if force:
        for path in (folder / name for name in files):
            path.unlink()
            if path.parent != folder and not any(path.parent.iterdir()):   # a case folder now empty
                path.parent.rmdir()
        return
    if not resume:
        finished = record.get("finished") and files == record["files"]
        done = "a finished" if finished else "an unfinished"
        raise InputError(f"{flag} {folder} holds {done} run ({shown}): continue it with --resume, "
                         "or pass --force to replace it")
    keys = changed(record.get("settings") or {}, settings, may_change)
    if keys:
        was = ", ".join(f"--{k.replace('_', '-')} {record['settings'].get(k)} -> {settings.get(k)}"
                        for k in keys)
        raise InputError(f"{flag} {folder} holds a run with other settings ({was}): continue it "
                         "with the same ones, or pass --force to replace it")
    read = changed(record.get("inputs") or {}, inputs or {}) if inputs is not None else []
    if read:
        more = f" (and {len(read) - 1} more)" if len(read) > 1 else ""
        raise InputError(f"{flag} {folder} holds a run that read other inputs: {read[0]} changed, "
                         f"came or went since{more}; continue it on the same inputs, or pass "
                         "--force to replace it")


def make_folder(folder, flag):
    """The output folder created, or InputError naming why it cannot be one."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:            # a file of that name, a parent that cannot be written
        why = "a file of that name exists" if folder.exists() else e.strerror
        raise InputError(f"{flag} {folder}: cannot be a folder ({why})") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"{flag} {folder}: folder is not writable")


def lock(folder, script):
    """One run per folder: its .lock holds the run's pid (the stale lock of a run killed with -9
    is taken over); freed by finish_run, or at exit (a refusal, a crash)."""
    path, pid = folder / ".lock", read_json(folder / ".lock")
    if pid == os.getpid():
        return
    if path.exists():
        take_over(path, pid, script)
    with open(path, "x") as f:       # exclusive: of two runs starting at once, one fails here
        f.write(str(os.getpid()))
    atexit.register(unlock, folder)


def take_over(path, pid, script):
    """A lock found: refused while its pid runs, else removed, and said."""
    try:
        os.kill(pid, 0)
        running = True
    except (ProcessLookupError, TypeError):         # no such process; an unreadable lock
        running = False
    except PermissionError:                          # running, as another user
        running = True
    if running:
        raise InputError(f"{path.parent} is in use by another run (pid {pid}, {path}): wait for it "
                         "to end, or choose another output folder")
    print(f"{script}: {path}: a stale lock of pid {pid} (no longer running); taking over",
          file=sys.stderr)
    path.unlink()


def unlock(folder):
    if read_json(Path(folder) / ".lock") == os.getpid():
        (Path(folder) / ".lock").unlink()


def finish_run(folder):
    """The run in `folder` is finished, said in its record; the folder is free again."""
    write_json(Path(folder) / RECORD, dict(read_json(Path(folder) / RECORD), finished=True))
    unlock(folder)


def refuse_inside(folder, source, flag, source_flag):
    """InputError for an output folder that is the input `source`'s folder or inside it (its
    files would mix with the input's)."""
    source, out = Path(source).resolve(), Path(folder).resolve()
    home = source if source.is_dir() else source.parent
    if out == home or home in out.parents:
        raise InputError(f"{flag} {folder} is (inside) {source_flag} {home}: write it to a folder "
                         "outside the input")


# ----------------------------------------------------------------------------- files

@contextmanager
def atomic(path):
    """`with atomic(path) as tmp:` write tmp, which becomes `path` only once complete."""
    tmp = Path(path).with_name(f".tmp.{Path(path).name}")      # beside it, the extension kept
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)     # a write that failed leaves nothing behind


def write_json(path, obj):
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def read_json(path):      # -> a JSON file's content, or None for one absent or unreadable
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def append_row(path, row):       # one JSON row, appended to a log (log.jsonl)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(path, step):
    """Drop the rows of a log logged after `step` (a resumed run logs them again)."""
    rows = [r for r in Path(path).read_text().splitlines() if r and json.loads(r)["step"] <= step]
    with atomic(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in rows))


# ------------------------------------------------------------------------ device, precision, memory

def pick_device(name="auto"):
    """--device: auto (CUDA if present), cpu, cuda, cuda:1, ...; InputError for one not here."""
    gpus = torch.cuda.device_count()
    here = ["cpu", *(["cuda"] if gpus else []), *(f"cuda:{i}" for i in range(gpus))]
    if name != "auto" and name not in here:
        raise InputError(f"--device {name}: not a device of this machine ({', '.join(here)}; "
                         f"torch {torch.__version__})")
    return torch.device(("cuda" if gpus else "cpu") if name == "auto" else name)


def amp_dtype(device, amp=True, channels=(), patch_size=()):
    """--amp -> torch.bfloat16 (else None: fp32) on a GPU, or on a CPU with bf16 instructions
    (elsewhere bf16 is emulated, slow) if bf16_gradient_ok at every level of the FPN."""
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    cpu_ok = bf16 and all(bf16_gradient_ok(c, l, patch_size) for l, c in enumerate(channels))
    fast = device.type == "cuda" or device.type == "cpu" and cpu_ok
    return torch.bfloat16 if amp and fast else None


def bf16_gradient_ok(channels, level, patch_size):
    """Does a bf16 3x3x3 convolution on this CPU give fp32's weight gradient (within 5%) at
    pyramid level `level`? Some CPUs' kernels do not at some sizes (an AMD EPYC, torch 2.13: where
    X is 2). Measured once per shape, on at most 32 channels and X <= 8: enough to show it."""
    shape = [math.ceil(p / 2 ** level) for p in patch_size]
    key = (min(channels, 32), min(shape[0], 8), *shape[1:])
    if key not in _BF16_OK:
        state = torch.random.get_rng_state()             # the run's random stream is not touched
        torch.manual_seed(0)
        conv, x = torch.nn.Conv3d(key[0], key[0], 3, padding=1), torch.randn(2, *key)
        torch.random.set_rng_state(state)
        grads = []
        for dtype in (torch.bfloat16, None):
            conv.zero_grad()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                conv(x).float().square().sum().backward()
            grads.append(conv.weight.grad.clone())
        _BF16_OK[key] = bool((grads[0] - grads[1]).norm() <= 0.05 * grads[1].norm())
        if not _BF16_OK[key]:
            print("note: this CPU's bf16 convolution gives a wrong weight gradient at pyramid "
                  f"level {level} ({'x'.join(map(str, shape))} voxels, measured): training in fp32",
                  file=sys.stderr)
    return _BF16_OK[key]


_BF16_OK = {}     # the probe's answers, per shape, for this process


def check_memory(needed, device, what):
    """InputError when `needed` bytes cannot fit in the device's memory (a GPU's, or the RAM)."""
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, "the GPU's"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"
    if needed > have:
        raise InputError(f"{what} needs at least {needed / 2 ** 30:.1f} GiB, more than {where} "
                         f"{have / 2 ** 30:.1f} GiB of memory: give smaller sizes")


def split_batch(total, world, unit=1, flag="--batch-size"):
    """A global batch over `world` processes, in multiples of `unit` -> items per process."""
    if total % (world * unit):
        raise InputError(f"{flag} {total} is the global batch: it must split evenly over {world} "
                         f"process(es){f' x {unit}' if unit > 1 else ''}")
    return total // world


def prepare_training(device):
    torch.set_flush_denormal(device.type == "cpu")  # denormals slow CPU steps as activations shrink
    torch.backends.cudnn.benchmark = True           # a training loop's sizes are fixed


def warmup(step, steps):
    """The linear lr warm-up of every training loop: step `step`'s factor, 1 after `steps`."""
    return min(1.0, (step + 1) / steps) if steps else 1.0


# ----------------------------------------------------------------------------- torchrun

def setup_distributed(device):
    """Under torchrun: torch.distributed initialised, this process's GPU -> (rank, world, device).
    """
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def world_info():
    """(rank, world size): (0, 1) unless launched by torchrun (setup_distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def end_distributed():
    """Every process waits for rank 0's last writes, then the group is torn down."""
    dist.barrier()
    dist.destroy_process_group()


def broadcast(obj):
    """Rank 0's `obj` in every process."""
    objects = [obj]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def wrap_ddp(module, device):
    """DistributedDataParallel over this process's device."""
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


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
    """All processes' embeddings, differentiably, so InfoNCE sees the global batch's negatives.
    Each process pads its (N, D) rows to max_voxels and marks the padding in `valid` (no sizes
    are exchanged); DDP's gradient averaging then gives the single-process gradient.
    -> (za, zb, valid) of W * max_voxels rows."""
    valid = torch.arange(max_voxels, device=za.device) < za.shape[0]            # (max_voxels,)
    pad = (0, 0, 0, max_voxels - za.shape[0])
    za, zb = torch.nn.functional.pad(za, pad), torch.nn.functional.pad(zb, pad)   # (max_voxels, D)
    return _GatherRows.apply(za), _GatherRows.apply(zb), _GatherRows.apply(valid.float()).bool()
