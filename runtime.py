"""What every stage needs from the machine, once: files written atomically, checkpoints read
without unpickling code, the device, torchrun and the output folder.

- atomic_write / save_json / save_torch: the file appears under its name only once complete (a
  temp file with a unique name in the same folder, then os.replace), so a killed run never
  leaves half a file, and two writers never share a temp file;
- load_torch: torch.load(weights_only=True): tensors and builtins only, a crafted pickle cannot
  run code; any failure is one line naming the file;
- pick_device / setup_distributed / world_info: --device and torchrun;
- make_output_dir: --out created and writable, or one line saying why not;
- claim_folder: one run per folder (a lock file holding the pid, stale locks recognised);
- argparse types (positive_int, ...): a bad number exits 2 where it is parsed.
"""
import argparse
import atexit
import json
import math
import os
import sys
import uuid
from pathlib import Path

import torch
import torch.distributed as dist


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


def load_torch(path, what="checkpoint"):
    """torch.load on the CPU with weights_only=True; ValueError, one line, for a missing file or
    one that is not tensors and builtins (a pickle with code in it, a truncated file, ...)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path} could not be read safely ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None


def make_output_dir(path, flag="--out"):
    """Create the output folder (and parents); ValueError, one line, if it cannot be created or written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: folder is not writable")
    return path


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


# ----------------------------------------------------------------------------- devices and torchrun

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


def unwrap(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def explicit_flags(parser, argv):
    """The destinations of the flags given on the command line, not taken from a default (the
    parser must not allow abbreviations)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return sorted({a.dest for a in parser._actions for token in argv
                   if token in a.option_strings or any(token.startswith(o + "=") for o in a.option_strings)})


# ----------------------------------------------------------------------------- flag types
# argparse `type=` functions: a bad value exits 2 with "error: argument --x: <why>" before any
# work. Every script's numeric flags use these.

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
    return check


positive_int = _checked(int, lambda v: v >= 1, ">= 1", "positive_int")
non_negative_int = _checked(int, lambda v: v >= 0, ">= 0", "non_negative_int")
positive_float = _checked(float, lambda v: v > 0, "> 0", "positive_float")
non_negative_float = _checked(float, lambda v: v >= 0, ">= 0", "non_negative_float")
open_fraction = _checked(float, lambda v: 0 < v < 1, "in (0, 1)", "open_fraction")          # a probability
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]", "unit_interval")        # a weight
momentum = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)", "momentum")                  # an EMA momentum, an overlap
