"""Preprocessing of a folder of NIfTI scans into fast-loading arrays (Sec. 3.1, transform.py);
`--demo` builds the demo set.

    python preprocess.py --input RAW_DIR --output DATA_DIR --modality ct [--workers 4]
    python preprocess.py --demo data/demo    # 20 labelled + 200 unlabelled synthetic abdomen CTs

RAW_DIR: a Decathlon / nnU-Net folder (imagesTr/, labelsTr/, imagesTs/, dataset.json) or a flat
folder of unlabelled scans. Several channels per case as nnU-Net keeps them (CASE_0000 ...
CASE_000k and `channel_names`, or Decathlon v1's one 4-D image and `modality`) are normalised
each by the scheme its name calls for ("CT": the CT window; any other: the MRI percentiles, as
nnU-Net treats non-CT channels); a single-channel dataset follows --modality. Output:
DATA_DIR/cases/<id>/{image.npy ((X, Y, Z) or (C, X, Y, Z)), body.npy, label.npy, meta.json} and
DATA_DIR/dataset.json; meta.json maps a prediction back onto the scan (transform.to_original_grid)
and records the identity of the raw files the case was made from and of the arrays written.

DATA_DIR holds one dataset, made by one run (runtime.claim_run): the same command again
continues it, redoing only a case whose raw files changed since (or that is missing); another
--input or preset is refused unless --force, which first removes every file the earlier run
wrote. A bad case is one `FAILED <file>: <reason>` line and the others finish; a bug in the
code stops the run with its traceback.
"""
import argparse
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

import demo
import runtime
from data import FORMAT_VERSION, InputError, file_identity
from runtime import atomic, non_negative_int, positive_float, positive_int, read_json, write_json
from transform import (PRESETS, channel_schemes, list_nifti, load_nifti, make_preset,
                       preprocess_arrays,
                       read_channels, read_dataset_description)

DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
MAX_DEMO_CASES = 10_000  # phantoms per demo set


# ---------------------------------------------------------------- one case

def preprocess_case(job):
    """Read, check, preprocess and save one case (a job of find_cases, completed by
    preprocess_folder) to OUT/cases/<id>/ -> None, or the message of bad input (a FAILED line):
    a worker runs it, and a bad case must not stop the others."""
    root, channels = job["root"], job["channels"]
    show = lambda path: str(Path(path).relative_to(root))
    label_name = show(job["label"]) if job["label"] else "label"
    try:
        images, affine, names = read_channels(job["images"], channels, show)
        label, label_affine = load_nifti(job["label"], label_name) if job["label"] else (None, None)
        image01, body, label, meta = preprocess_arrays(
            images, affine, job["modality"], job["spacing"], label, label_affine=label_affine,
            names=(names, label_name), max_label=job["max_label"],
            schemes=[c["scheme"] for c in channels])
    except InputError as e:
        return str(e)
    case_dir = Path(job["out_dir"]) / "cases" / job["case_id"]
    case_dir.mkdir(parents=True, exist_ok=True)
    (case_dir / "meta.json").unlink(missing_ok=True)    # the case is incomplete until it is back
    arrays = {}
    for name, array in (("image.npy", image01.astype(np.float16)), ("body.npy", body),
                        ("label.npy", label)):
        if array is not None:
            with atomic(case_dir / name) as tmp:
                np.save(tmp, array)
            arrays[name] = file_identity(case_dir / name)
    values = np.flatnonzero(np.bincount(label.ravel())).tolist() if label is not None else None
    write_json(case_dir / "meta.json", dict(      # last: its presence marks the case complete
        format_version=FORMAT_VERSION, case_id=job["case_id"], split=job["split"],
        sources=job["sources"], arrays=arrays, image_file=str(Path(job["images"][0]).resolve()),
        label_file=str(Path(job["label"]).resolve()) if job["label"] else None,
        label_values=values, channels=channels, **meta))
    return None


def sources(job):
    """The identity of a case's raw files, {path in the raw folder: [size, mtime_ns]}."""
    files = job["images"] + ([job["label"]] if job["label"] else [])
    return {str(Path(f).relative_to(job["root"])): file_identity(f) for f in files}


def is_current(case_dir, job, preset, channels):
    """A case made by this code, with this preset and channels, from the raw files as they are."""
    meta = read_json(Path(case_dir) / "meta.json") or {}
    return (meta.get("format_version") == FORMAT_VERSION and meta.get("preset") == preset
            and meta.get("channels") == channels and meta.get("sources") == job["sources"])


# ---------------------------------------------------------------- a folder of cases

def find_cases(raw_dir, num_channels=1):
    """-> (jobs: dicts(case_id, images, label, split), failures: messages naming the files). In a
    Decathlon / nnU-Net folder, a case is CASE.nii.gz or its channels CASE_0000 ... (num_channels).
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise InputError(f"{raw_dir}: input folder does not exist")
    decathlon = (raw_dir / "imagesTr").is_dir()  # else a flat folder of unlabelled scans
    labels = dict(list_nifti(raw_dir / "labelsTr")) if decathlon else {}
    jobs, failures, present = [], [], set()
    for split, folder in [("train", "imagesTr"),
                          ("test", "imagesTs")] if decathlon else [("unlabelled", ".")]:
        cases = {}                                    # case id -> {channel (None: no suffix): path}
        for stem, path in list_nifti(raw_dir / folder):
            match = re.fullmatch(r"(.+)_(\d{4})", stem) if decathlon else None  # nnU-Net's _0000
            case_id, channel = (match[1], int(match[2])) if match else (stem, None)
            name = path.relative_to(raw_dir)
            if case_id in {j["case_id"] for j in jobs} or channel in cases.get(case_id, {}) or \
                    (cases.get(case_id) and (channel is None) != (None in cases[case_id])):
                failures.append(f"{name}: duplicate case id {case_id!r}")
            elif channel is not None and channel >= num_channels:
                failures.append(f"{name}: channel _{channel:04d}, but the dataset has "
                                f"{num_channels} channel(s) (dataset.json's channel_names / "
                                "modality); skipped")
            else:
                cases.setdefault(case_id, {})[channel] = path
        present |= set(cases) if split == "train" else set()
        for case_id, files in cases.items():
            images = [files[k] for k in sorted(files, key=lambda k: k or 0)]
            missing = [k for k in range(num_channels) if None not in files and k not in files]
            if missing:
                failures.append(f"{folder}/{case_id}: channel _{missing[0]:04d} is missing "
                                f"({num_channels} per case)")
            elif split == "train" and case_id not in labels:
                failures.append(f"{images[0].relative_to(raw_dir)}: no label "
                                f"labelsTr/{case_id}.nii.gz")
            else:
                jobs.append(dict(case_id=case_id, images=images, split=split,
                                 label=labels.get(case_id) if split == "train" else None))
    failures += [f"labelsTr/{p.name}: label without an image in imagesTr/"
                 for s, p in labels.items() if s not in present]
    if not jobs and not failures:
        raise InputError(f"{raw_dir}: no .nii / .nii.gz files found (expected imagesTr/ + "
                         "labelsTr/, or a flat folder of scans)")
    return jobs, failures


def map_jobs(jobs, workers, fn=preprocess_case):
    """fn over jobs, inline (workers <= 1) or in worker processes, in completion order. An
    exception in fn (a bug) stops the run with its traceback, the worker's included; a worker
    killed (as by the out-of-memory killer) fails its job alone, retried in a fresh process."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    retry = []
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                             initializer=_die_with_parent) as pool:
        futures = {pool.submit(fn, j): j for j in jobs}
        try:
            for f in as_completed(futures):
                try:
                    yield f.result()
                except BrokenProcessPool:       # a worker was killed: every job left fails
                    retry.append(futures[f])
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a bug or Ctrl-C: the jobs not begun are not run
            raise
    for job in retry:                   # each alone in a fresh process: a crash now is its own
        with ProcessPoolExecutor(max_workers=1, initializer=_die_with_parent) as pool:
            try:
                yield pool.submit(fn, job).result()
            except BrokenProcessPool:
                name = Path(job["images"][0]).relative_to(job["root"]) if isinstance(job,
                                                                                     dict) else job
                yield f"{name}: its worker process died (killed, or out of memory)"


def _die_with_parent():
    """Worker initializer: on Linux, get SIGTERM when the parent dies (no orphaned workers)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
        except OSError:
            pass


def preprocess_folder(raw_dir, out_dir, modality, spacing=None, workers=1, force=False, extra=None):
    """Preprocess a raw folder into one dataset -> dict(done, skipped, failed: one message per
    bad case). The output folder is claimed as one run (runtime.claim_run) of this input, preset
    and channels: a re-run continues it, redoing a case only if it is missing or its raw files
    changed; others are refused unless force. extra: {name: JSON} files written with the run."""
    preset = make_preset(modality, spacing)
    runtime.refuse_inside(out_dir, raw_dir, "--output", "--input")
    labels, names = read_dataset_description(raw_dir)
    channels = channel_schemes(names, modality)
    jobs, failed = find_cases(raw_dir, len(channels))
    outputs = ["dataset.json",
               *(extra or {})] + [f"cases/{j['case_id']}/{name}" for j in jobs for name in (
        "image.npy", "body.npy", "meta.json", *(["label.npy"] if j["label"] else []))]
    settings = dict(input=str(Path(raw_dir).resolve()), preset=preset, channels=channels)
    runtime.claim_run(out_dir, "preprocess.py", outputs, settings, force=force, resume=not force,
                      flag="--output")
    for job in jobs:
        job.update(out_dir=str(out_dir), modality=modality, spacing=spacing, root=Path(raw_dir),
                   channels=channels, max_label=max(map(int, labels)) if labels else 255)
        job["sources"] = sources(job)
    current = lambda job: is_current(Path(out_dir) / "cases" / job["case_id"],
                                     job, preset, channels)
    todo = [j for j in jobs if not current(j)]
    for message in failed:
        print(f"FAILED {message}", file=sys.stderr)
    done = 0
    for message in tqdm(map_jobs(todo, workers), total=len(todo), desc="preprocess", unit="case"):
        if message is None:
            done += 1
        else:
            tqdm.write(f"FAILED {message}", file=sys.stderr)
            failed.append(message)
    metas = [read_json(Path(out_dir) / "cases" / j["case_id"] / "meta.json") for j in jobs
             if current(j)]
    values = [v for m in metas for v in m["label_values"] or []]
    if labels is None and values:  # no dataset.json in the input: number the classes
        labels = {str(v): f"class_{v}" if v else "background" for v in range(max(values) + 1)}
    for name, content in (extra or {}).items():
        write_json(Path(out_dir) / name, content)
    cases = [dict(id=m["case_id"], split=m["split"], labelled=m["label_file"] is not None,
                  shape=m["shape"]) for m in metas]
    write_json(Path(out_dir) / "dataset.json", dict(
        format_version=FORMAT_VERSION, modality=modality, preset=preset, channels=channels,
        labels=labels, cases=cases))
    runtime.finish_run(out_dir)
    result = dict(done=done, skipped=len(jobs) - len(todo), failed=failed)
    print(f"done {done} / skipped {result['skipped']} / failed {len(failed)}")
    return result


def build_demo(folder, num_cases=20, unlabelled_cases=200, seed=0, workers=1, scale=demo.DEMO_SCALE,
               force=False):
    """`--demo DATA_DIR`: the demo's phantoms (demo.py) written as raw NIfTI and preprocessed like
    real data: the labelled set into DATA_DIR with its fixed split (split.json), and the unlabelled
    pretraining corpus of other phantoms into DATA_DIR/unlabelled. force: a demo made with other
    settings there is replaced."""
    folder = Path(folder)
    if num_cases < 3:
        raise InputError(f"--num-cases {num_cases}: the demo's split needs at least 3 labelled "
                         "cases (a training, a validation and a test case)")
    split = {"split.json": demo.demo_split([f"demo_{i:03d}" for i in range(num_cases)], seed)}
    for out, count, unlabelled in ((folder, num_cases, False),
                                   (folder / "unlabelled", unlabelled_cases, True)):
        if count:
            jobs = demo.raw_jobs(out / "raw", count, seed, scale, unlabelled, force)
            for _ in tqdm(map_jobs(jobs, workers, demo.write_case), total=len(jobs),
                          desc="demo phantoms"):
                pass
            runtime.finish_run(out / "raw")
            result = preprocess_folder(out / "raw", out, "ct", workers=workers, force=force,
                                       extra=None if unlabelled else split)
            if result["failed"]:
                raise InputError(f"demo preprocessing failed: {result['failed']}")
    corpus = (f", and {unlabelled_cases} unlabelled ones of another seed stream in "
              f"{folder / 'unlabelled'}, the pretraining corpus of `pretrain.py --data demo`")
    print(f"demo data in {folder}: {num_cases} labelled phantoms (split.json: training pool / "
          f"validation / test){corpus if unlabelled_cases else ''}")
    return folder


# ---------------------------------------------------------------- main

def main(args):
    """-> exit code: 0 ok, 1 some case failed (bad input before any case: exit 2)."""
    if args.demo:
        build_demo(args.demo, args.num_cases, args.unlabelled_cases, args.seed, args.workers,
                   force=args.force)
        return 0
    result = preprocess_folder(args.input, args.output, args.modality, args.spacing, args.workers,
                               force=args.force)
    return 1 if result["failed"] else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Sec. 3.1 preprocessing of NIfTI scans",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
    # real data
    parser.add_argument("--input", help="Decathlon/nnU-Net folder or flat folder of .nii(.gz)")
    parser.add_argument("--output", help="preprocessed data folder (DATA_DIR)")
    parser.add_argument("--modality", choices=sorted(PRESETS),
                        help="preset of Sec. 3.1 (its spacing; its scheme for a single channel)")
    parser.add_argument("--spacing", type=positive_float, nargs=3, metavar=("X", "Y", "Z"),
                        help="override the preset's spacing (mm)")
    parser.add_argument("--force", action="store_true",
                        help="replace the run in --output (or --demo): its files removed first")
    # synthetic demo
    parser.add_argument("--demo", metavar="DATA_DIR",
                        help="write + preprocess the demo set (data/demo: `--data demo`)")
    parser.add_argument("--num-cases", type=positive_int, default=20, help="demo cases")
    parser.add_argument("--unlabelled-cases", type=non_negative_int, default=200,
                        help="demo: also a pretraining corpus of this many other phantoms in "
                             "DATA_DIR/unlabelled")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="demo seed")
    # speed
    parser.add_argument("--workers", type=runtime.worker_count, default=DEFAULT_WORKERS,
                        help="processes")
    return runtime.parse(parser, argv, refusals=refusals)


def refusals(a):
    if not a.demo and not (a.input and a.output and a.modality):
        yield "--input, --output and --modality are required (or --demo DATA_DIR)"
    if max(a.num_cases, a.unlabelled_cases) > MAX_DEMO_CASES:
        yield f"--num-cases / --unlabelled-cases: at most {MAX_DEMO_CASES} demo phantoms each"
    if a.demo and (a.input or a.output or a.modality):
        yield ("--demo writes the demo set; --input, --output and --modality preprocess your "
               "scans: give one of the two")


if __name__ == "__main__":
    runtime.cli(main, parse_args,
                interrupted="interrupted; finished cases are kept, a re-run skips them")
