"""Datasets on preprocessed arrays: overlapping patch pairs with exact voxel correspondences
(pretraining, Sec. 2.2), labelled patches (downstream, Sec. 3.2), and the one reader of a case.

preprocess.py writes DATA_DIR/dataset.json and DATA_DIR/cases/<id>/{image.npy ((X, Y, Z), or
(C, X, Y, Z) for C channels), body.npy, label.npy, meta.json}, in canonical RAS voxel order;
read_case opens them memory-mapped, so only the touched region is read. Coordinates: (N, 3) =
(x, y, z) in one patch's frame, or (N, 4) = (pair index in the batch, x, y, z) after collation.

Pairs (Sec. 2.2, vox2vec): an anchor body voxel, two crops that both contain it (pure shifts), and
n voxels in the body and in both crops: a positive pair is the same voxel at coords_a in patch A
and coords_b in patch B. The reference does this over every body voxel of the scan (~4 s a batch);
here only the body mask inside the crops' intersection is read. Items are un-augmented (augment.py
works on the training device). Item i draws everything from np.random.default_rng([seed, i]), so
batches depend neither on which worker makes them nor on how many workers there are.
"""
import json
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1              # of the folder preprocess.py writes (dataset.json, meta.json)
DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"   # `--data demo`: preprocess.py --demo
ANCHOR_TRIES = 200              # rejection-sampling draws before the argwhere fallback
ANCHOR_STRIDE = 4               # subsampling of the body mask for the fallback (1/64 of the voxels)
OVERLAP_RETRIES = 10            # new crops tried when the overlap has < num_voxels body voxels
MAX_CLASS_VOXELS = 10_000       # per-class voxel coordinates cached for foreground oversampling


class InputError(Exception):
    """Bad input, the user's to fix: raised only by the boundary's checks (flags, this case
    reader, weight files, the run folder, the comparison of inputs) and reported by runtime.cli in
    one line, exit 2. Any other exception is a bug and keeps its traceback. Defined here, in the
    lowest file that raises it, so that the components still import nothing of the project."""


def file_identity(path):
    """What tells a file from its replacement unread (make, rsync): [size, modification time ns]."""
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


# -------------------------------------------------------------------- the data folder and its cases

def read_dataset(arg, demo_part=""):
    """--data: a preprocessed folder, or `demo` (DEMO_DIR / demo_part) -> (folder, dataset.json)."""
    folder = DEMO_DIR / demo_part if arg == "demo" else Path(arg)
    path = folder / "dataset.json"
    if arg == "demo" and not path.is_file():
        raise InputError(f"--data demo: {folder} is not built yet; run `python preprocess.py "
                         "--demo data/demo` first")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:      # no folder, no file, not JSON
        what = (f"{path}: unreadable ({type(e).__name__})" if path.is_file() else f"{path}: missing"
                if folder.is_dir() else f"{folder}: no such data folder")
        raise InputError(f"{what}; make it with preprocess.py") from None
    version = info.get("format_version") if isinstance(info, dict) else None
    if version != FORMAT_VERSION or not info.get("cases"):
        raise InputError(f"{path}: format_version {version} (this code reads {FORMAT_VERSION}) or "
                         "no cases; re-run preprocess.py")
    return folder, info


def list_cases(info, labelled=None):
    """The case ids of a dataset.json in its order, optionally only the (un)labelled ones."""
    return [c["id"] for c in info["cases"] if labelled is None or c["labelled"] == labelled]


def preprocessing(info):
    """How a folder was preprocessed: {"spacing": mm, "channels": [{"name", "scheme"}]}."""
    return dict(spacing=info["preset"]["spacing"], channels=info["channels"])


def read_case(data_dir, case_id, need_label=False, classes=None, check=True):
    """The one reader of a preprocessed case -> dict(image float16 (C, X, Y, Z), body bool
    (X, Y, Z), label uint8 (X, Y, Z) or None, memory-mapped; meta; identity of each file), or an
    InputError naming the file and the fix (then verify, unless a worker re-opens the case)."""
    case_dir = Path(data_dir) / "cases" / str(case_id)
    fix = f"re-run preprocess.py on it (delete {case_dir} first)"
    case, identity = dict(label=None), {}
    for name in ("meta", "image", "body", "label"):     # meta.json is written last
        path = case_dir / (name + (".json" if name == "meta" else ".npy"))
        if name == "label" and not (path.exists() or need_label or case["meta"].get("label_file")):
            continue
        if not path.exists():
            missing = f"case {case_id!r} not found or incomplete" if name == "meta" else "missing"
            raise InputError(f"{path}: {missing}; {fix}")
        try:
            meta = name == "meta"
            case[name] = json.loads(path.read_text()) if meta else np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:    # truncated, not JSON, not an array
            why = f"{type(e).__name__}: {str(e)[:80]}".replace("\n", " ")
            raise InputError(f"{path}: unreadable ({why}); {fix}") from None
        identity[path.name] = file_identity(path)
    image = case["image"]
    if image.ndim not in (3, 4):
        raise InputError(f"{case_dir / 'image.npy'}: shape {image.shape}, not (X, Y, Z) or "
                         f"(C, X, Y, Z); {fix}")
    case["image"] = image = image[None] if image.ndim == 3 else image
    for name in ("body", "label"):
        if case[name] is not None and case[name].shape != image.shape[1:]:
            raise InputError(f"{case_dir / name}.npy: shape {case[name].shape} != image "
                             f"{image.shape[1:]}; {fix}")
    record = case["meta"].get("arrays", {})
    changed = [n for n, i in identity.items() if n != "meta.json" and record.get(n) != i]
    if check and (changed or classes is not None):
        verify(case_dir, case, changed, classes, fix)
    return dict(case, identity=identity)


def verify(case_dir, case, changed, classes, fix):
    """What preprocess.py checked, checked again where it no longer holds: an array whose
    identity differs from meta.json's record of it (changed) is read whole and refused for a
    non-finite voxel or an empty body; a label value must be a class of `classes`."""
    image, body, label = case["image"], case["body"], case["label"]
    if "image.npy" in changed and not np.isfinite(image).all():
        where = tuple(np.argwhere(~np.isfinite(image))[0].tolist())
        raise InputError(f"{case_dir / 'image.npy'}: a non-finite voxel ({image[where]} at "
                         f"{where}); {fix}")
    if "body.npy" in changed and not body.any():
        raise InputError(f"{case_dir / 'body.npy'}: no body voxel; {fix}")
    values = case["meta"].get("label_values") or []                # what preprocess.py found there
    values = np.unique(label).tolist() if "label.npy" in changed else values
    wrong = [v for v in values if classes is not None and str(v) not in classes]
    if wrong:
        raise InputError(f"{case_dir / 'label.npy'}: label value {wrong[0]}, not a class of its "
                         f"dataset.json ({', '.join(classes)}); {fix}")


def read_split(path, labelled):
    """A fixed split file {"train": [...], "val": [...], "test": [...]} of labelled case ids
    (preprocess.py --demo writes one): InputError, one line naming the case or list at fault,
    unless the three are disjoint, every id is a labelled case, and train and test are not empty."""
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--split {path}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(split, dict) or set(split) != {"train", "val", "test"} or \
            not all(isinstance(v, list) for v in split.values()):
        raise InputError(f"--split {path}: needs exactly the keys train, val and test, each a list "
                         "of case ids")
    rule, seen = (f"--split {path}: train / val / test must be disjoint lists of labelled cases, "
                  "train and test not empty"), {}
    for part, ids in split.items():
        for c in ids:
            if c not in labelled:
                raise InputError(f"{rule}; case {c!r} in {part!r} is not a labelled case of the "
                                 "data")
            if c in seen:
                raise InputError(f"{rule}; case {c!r} is in both {seen[c]!r} and {part!r}")
            seen[c] = part
    for part in ("train", "test"):
        if not split[part]:
            raise InputError(f"{rule}; the {part!r} list is empty")
    return {k: sorted(v) for k, v in split.items()}


# ------------------------------------------------------------------------ patches
def read_patch(array, start, size, fill=0):
    """array[..., start : start + size] of a (..., X, Y, Z) array/memmap, `fill` outside the volume.

    start may be negative or run past the end. Only the in-volume part is sliced (a memmap reads
    just those pages) and copied into a new array of shape (..., *size)."""
    start, size = np.asarray(start, np.int64), np.asarray(size, np.int64)
    shape = np.asarray(array.shape[-3:])
    lo, hi = np.maximum(start, 0), np.minimum(start + size, shape)
    out = np.full(array.shape[:-3] + tuple(size), fill, dtype=array.dtype)
    if np.all(hi > lo):
        src = (..., *(slice(a, b) for a, b in zip(lo, hi)))
        dst = (..., *(slice(a, b) for a, b in zip(lo - start, hi - start)))
        out[dst] = np.asarray(array[src])
    return out


def start_range(center, dim, patch):
    """Inclusive (lo, hi) of patch starts along one axis that contain voxel `center` and stay in
    the volume; when the volume is shorter than the patch, the patch covers the whole axis and
    the start is negative (zero padding)."""
    lo = np.maximum(center - patch + 1, np.minimum(0, dim - patch))
    hi = np.minimum(center, np.maximum(0, dim - patch))
    return lo, hi


def sample_anchor(body, rng):
    """A random body voxel (3,) int64: rejection sampling touches a few voxels of the memmap
    (uniform over the body); if the body is sparse, fall back to np.argwhere on a strided
    subsample (uniform over the subsample), then on the whole mask."""
    shape = np.asarray(body.shape)
    for _ in range(ANCHOR_TRIES):
        v = rng.integers(0, shape)
        if body[tuple(v)]:
            return v.astype(np.int64)
    s = ANCHOR_STRIDE
    for stride in (s, 1):
        found = np.argwhere(np.asarray(body[::stride, ::stride, ::stride]))  # (M, 3)
        if len(found):
            return found[rng.integers(len(found))].astype(np.int64) * stride
    raise ValueError("sample_anchor: the body mask has no voxel (read_case refuses such a case)")


def sample_pair(image, body, patch_size, num_voxels, rng):
    """Two overlapping patches of one volume and up to num_voxels positive voxel pairs (Sec. 2.2).

    image (X,Y,Z) float array/memmap, body (X,Y,Z) bool. Returns dict with patch_a, patch_b
    float32 `patch_size`; coords_a, coords_b int64 (n, 3) in each patch's frame; start_a, start_b
    int64 (3,): voxel c of patch_a is image[start_a + c], and row k of coords_a and coords_b is
    the same volume voxel. 1 <= n <= num_voxels: if after OVERLAP_RETRIES new crops the overlap
    holds fewer body voxels, all of them are used (once each: a duplicate would be a negative of
    itself in InfoNCE); the anchor guarantees n >= 1."""
    patch, shape = np.asarray(patch_size, np.int64), np.asarray(image.shape, np.int64)
    if image.shape != body.shape or patch.shape != (3,):
        raise ValueError(f"sample_pair: image {image.shape}, body {body.shape}, patch "
                         f"{tuple(patch)}")
    best = None
    for _ in range(OVERLAP_RETRIES):
        anchor = sample_anchor(body, rng)
        lo, hi = start_range(anchor, shape, patch)
        start_a, start_b = rng.integers(lo, hi + 1), rng.integers(lo, hi + 1)  # (3,) each
        # Intersection of both crops and the volume; contains the anchor, so never empty.
        box_lo = np.maximum(np.maximum(start_a, start_b), 0)
        box_hi = np.minimum(np.minimum(start_a, start_b) + patch, shape)
        box = np.asarray(body[tuple(slice(a, b) for a, b in zip(box_lo, box_hi))])  # (hx, hy, hz)
        flat = np.flatnonzero(box)  # body voxels of the overlap, raveled in the box
        if best is None or len(flat) > len(best[-1]):
            best = (start_a, start_b, box_lo, box.shape, flat)
        if len(flat) >= num_voxels:
            break
    start_a, start_b, box_lo, box_shape, flat = best
    assert len(flat) >= 1, "the anchor lies in the overlap"
    pick = (rng.choice(len(flat), num_voxels, replace=False) if len(flat) > num_voxels
            else rng.permutation(len(flat)))
    voxels = np.stack(np.unravel_index(flat[pick], box_shape), 1) + box_lo  # (n, 3) volume frame
    return dict(patch_a=read_patch(image, start_a, patch).astype(np.float32),
                patch_b=read_patch(image, start_b, patch).astype(np.float32),
                coords_a=voxels - start_a, coords_b=voxels - start_b,
                start_a=start_a.astype(np.int64), start_b=start_b.astype(np.int64))


class CaseDataset(torch.utils.data.Dataset):
    """Base of the map-style datasets below: `length` items, item i from volume i % num_volumes.
    Every case is read once here, in the main process (read_case: a broken case is one line before
    any work, never in a DataLoader worker), and again lazily in each worker. `inputs` holds
    each case's identity, for a run to record what it read."""

    def __init__(self, data_dir, case_ids, length, seed, patch_size, need_label=False):
        self.data_dir, self.length, self.seed = Path(data_dir), length, seed
        self.patch_size, self.need_label, self.cases = tuple(patch_size), need_label, {}
        info = read_dataset(data_dir)[1]
        known = list_cases(info, labelled=True if need_label else None)
        self.case_ids = known if case_ids is None else list(case_ids)
        if not self.case_ids or set(self.case_ids) - set(known):
            raise InputError(f"{self.data_dir / 'dataset.json'}: no "
                             f"{'labelled ' if need_label else ''}case(s) "
                             f"{sorted(set(self.case_ids) - set(known)) or ''}")
        shapes, self.inputs = {}, {}
        for c in self.case_ids:
            case = read_case(data_dir, c, need_label, info["labels"])
            shapes[c] = case["image"].shape
            self.inputs[str(self.data_dir.resolve() / "cases" / c)] = case["identity"]
        small = [f"{c} {s[1:]}" for c, s in shapes.items()
                 if any(n < p for n, p in zip(s[1:], self.patch_size))]
        if small:
            print(f"note: {len(small)} case(s) smaller than the patch {self.patch_size}, "
                  f"zero-padded: {', '.join(small[:5])}{' ...' if len(small) > 5 else ''}")
        self.channels = {c: s[0] for c, s in shapes.items()}

    def __getstate__(self):  # a pickled memmap becomes a full in-memory copy: reopen in the worker
        return {**self.__dict__, "cases": {}}

    def case(self, case_id):
        if case_id not in self.cases:
            self.cases[case_id] = read_case(self.data_dir, case_id, self.need_label, check=False)
        return self.cases[case_id]

    def __len__(self):
        return self.length


class PairDataset(CaseDataset):
    """Pretraining pairs. Item i is a list of pairs_per_volume sample_pair dicts (plus case_id)
    from volume i % num_volumes, drawn with np.random.default_rng([seed, i]); a multi-channel case
    is read as one volume per channel (the backbone is single-channel, as the paper's).

    The paper's batch is 10 pairs (Sec. 3): the reference takes them from one volume
    (pairs_per_volume=10, loader batch 1); pairs_per_volume=1 with loader batch 10 mixes volumes."""

    def __init__(self, data_dir, patch_size=(128, 128, 32), num_voxels=1024, pairs_per_volume=1,
                 length=100_000, seed=0, case_ids=None):
        super().__init__(data_dir, case_ids, length, seed, patch_size)
        self.num_voxels, self.pairs_per_volume = num_voxels, pairs_per_volume
        self.volumes = [(c, k) for c in self.case_ids for k in range(self.channels[c])]

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        case_id, channel = self.volumes[i % len(self.volumes)]
        c = self.case(case_id)
        volume, body = c["image"][channel], c["body"]
        return [dict(sample_pair(volume, body, self.patch_size, self.num_voxels, rng),
                     case_id=case_id) for _ in range(self.pairs_per_volume)]


def collate_pairs(items):
    """Flatten items (pair dicts or lists of them) into one batch of B pairs: patches_a,
    patches_b (B,1,X,Y,Z) float32; coords_a, coords_b (N,4) int64 = (pair index, x, y, z) with
    N = total voxels over pairs (counts may differ per pair); row k of a and b is a positive
    pair."""
    pairs = [p for item in items for p in ([item] if isinstance(item, dict) else item)]
    out = {}
    for v in "ab":
        out[f"patches_{v}"] = torch.from_numpy(np.stack([p[f"patch_{v}"] for p in pairs])[:, None])
        out[f"coords_{v}"] = torch.from_numpy(np.concatenate([  # (n_b, 4) per pair -> (N, 4)
            np.concatenate([np.full((len(p[f"coords_{v}"]), 1), b, np.int64), p[f"coords_{v}"]], 1)
            for b, p in enumerate(pairs)]))
    return out


# ------------------------------------------------------------------------ labelled patches
def class_voxels(label, rng, max_voxels=MAX_CLASS_VOXELS):
    """{class: (M, 3) int64 coordinates of <= max_voxels random voxels of that class} for every
    foreground class present in label (X,Y,Z). One pass over the volume."""
    label = np.asarray(label)
    flat = np.flatnonzero(label)
    values = label.reshape(-1)[flat]
    order = np.argsort(values, kind="stable")
    classes, first = np.unique(values[order], return_index=True)
    out = {}
    for c, idx in zip(classes, np.split(flat[order], first[1:])):
        if len(idx) > max_voxels:
            idx = rng.choice(idx, max_voxels, replace=False)
        out[int(c)] = np.stack(np.unravel_index(idx, label.shape), 1).astype(np.int64)
    return out


class LabelledPatchDataset(CaseDataset):
    """Downstream training patches (Sec. 3.2): item i (from case case_ids[i % num_cases], rng
    np.random.default_rng([seed, i])) is dict(image (C,X,Y,Z) float32, label (X,Y,Z) int64).

    Foreground oversampling as in the reference (nnU-Net style): with foreground_prob the patch
    is centred on a voxel of a random class present in the case (clipped into the volume), else
    its start is uniform. The per-class voxel lists are built once per case (and worker) and
    subsampled to MAX_CLASS_VOXELS, so an item does not scan the whole label."""

    def __init__(self, data_dir, case_ids, patch_size, length, seed=0, foreground_prob=0.5):
        super().__init__(data_dir, case_ids, length, seed, patch_size, need_label=True)
        self.foreground_prob, self.classes = foreground_prob, {}

    def foreground(self, case_id):
        """class_voxels of a case, built lazily in each worker from its own seed stream (so the
        same in every worker)."""
        if case_id not in self.classes:
            rng = np.random.default_rng([self.seed, self.case_ids.index(case_id), 0x5EED])
            self.classes[case_id] = class_voxels(self.case(case_id)["label"], rng)
        return self.classes[case_id]

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        case_id = self.case_ids[i % len(self.case_ids)]
        c, patch = self.case(case_id), np.asarray(self.patch_size)
        shape = np.asarray(c["label"].shape)
        lo, hi = np.minimum(0, shape - patch), np.maximum(0, shape - patch)  # starts in the volume
        classes = self.foreground(case_id) if rng.random() < self.foreground_prob else {}
        if classes:
            voxels = classes[list(classes)[rng.integers(len(classes))]]
            start = np.clip(voxels[rng.integers(len(voxels))] - patch // 2, lo, hi)
        else:
            start = rng.integers(lo, hi + 1)
        image = read_patch(c["image"], start, patch).astype(np.float32)          # (C, X, Y, Z)
        label = read_patch(c["label"], start, patch).astype(np.int64)
        return dict(image=torch.from_numpy(image), label=torch.from_numpy(label))


# ------------------------------------------------------------------------ batches of a run
def step_loader(dataset, steps, per_rank, rank=0, world=1, start=0, workers=0, collate_fn=None):
    """`per_rank` items a step, steps [start, steps), for process `rank` of `world`: step s reads
    items s * world * per_rank + rank + world * j (a lazy range). Item k is a function of (seed,
    k): a resumed run, another worker count, `world` processes together see the same batches."""
    order = range(start * world * per_rank + rank, steps * world * per_rank, world)
    return torch.utils.data.DataLoader(dataset, per_rank, sampler=order, collate_fn=collate_fn,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers else None)
