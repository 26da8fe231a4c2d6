"""The hostile table of docs/reliability.md: unusual and wrong command lines against every script,
run in a work folder of its own on a small demo and tiny models, each with the exit code and last
line it should give; a row whose exit code or last line differs, or that prints a traceback, is
BAD. Kinds: the run folder, sizes, the case reader, flags a run cannot honour, weight files,
input scans, the lab.

    python experiments/hostile.py --work /tmp/hostile --out docs/hostile.md    # ~6 min on 2 cores
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runtime  # noqa: E402
from data import InputError  # noqa: E402
from runtime import non_negative_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = r"(?<![\w/.])((?:experiments/)?\w+\.py)"
PRE = (
    "--preset demo --base-channels 4 --num-levels 3 --patch-size 16 16 8 --batch-pairs 2 "
    "--num-voxels 32 --workers 0"
)
FT = (
    "--preset demo --steps 3 --batch-size 1 --patch-size 16 16 8 --workers 0 --bn-batches 2 "
    "--eval-patch-size 64 64 32"
)
FTR0 = f"--data data/demo --init random --base-channels 4 --num-levels 3 {FT}"
FTR = f"{FTR0} --folds 3"
FTC = f"{FT} --freeze-steps 1 --ramp-steps 1"  # from a backbone: a freeze that fits 3 steps
FTC0 = f"{FTC} --folds 3"
SETUP = [
    "preprocess.py --demo data/demo --num-cases 6 --unlabelled-cases 4 --workers 1",
    f"pretrain.py --data data/demo/unlabelled --out runs/pre --steps 4 {PRE}",
    f"finetune.py {FTR} --out runs/ft",
    "mkdir -p scans && cp data/demo/raw/imagesTr/demo_000.nii.gz "
    "data/demo/raw/imagesTr/demo_001.nii.gz scans/",
    "predict.py -i scans -o pred --model runs/ft",
    "cp -r data/demo bad && rm -rf bad/unlabelled bad/raw",
    "python -c \"import demo; demo.multichannel_raw('data/demo/raw', 'two', ('CT', 'T2'))\"",
    "mkdir -p repo && cp $REPO/*.py repo/",  # a copy of the product, for a researcher's bug
    f"finetune.py --data data/demo --checkpoint runs/pre {FTC0} --out runs/ftc",
    "python -c \"import demo; demo.multichannel_raw('data/demo/raw', 'one', ('CT',))\"",
]
TRUNC = (
    "python -c \"import sys; p = sys.argv[1]; b = open(p, 'rb').read(); "
    "open(p, 'wb').write(b[:len(b) // 2])\""
)
NAN = (
    'python -c "import sys, numpy as np; p = sys.argv[1]; a = np.load(p); a.flat[a.size // 2] = '
    'np.nan; np.save(p, a)"'
)
HALF = (  # the image's values halved: another content, still finite, in [0, 1]
    'python -c "import sys, numpy as np; p = sys.argv[1]; np.save(p, np.load(p) / 2)"'
)
LABEL9 = (
    'python -c "import sys, numpy as np; p = sys.argv[1]; a = np.load(p); a.flat[0] = 12; '
    'np.save(p, a)"'
)
NOBODY = (
    'python -c "import sys, numpy as np; p = sys.argv[1]; np.save(p, np.zeros_like(np.load(p)))"'
)
NANPT = (
    'python -c "import sys, torch; p, q = sys.argv[1:]; s = torch.load(p, weights_only=True); '
    "[t.fill_(float('nan')) for k, t in s['state_dict'].items() if k.endswith('weight')][:1]; "
    'torch.save(s, q)"'
)
EVIL = (
    "python -c \"import torch, os; R = type('R', (), {'__reduce__': lambda s: (os.system, ('touch "
    "pwned',))}); torch.save({'x': R()}, 'evil.pt')\""
)
# (kind, command, expected exit code, words the last line holds ("" any), words no line may hold,
#  and, for a bug, words the traceback must hold: its file and line; any other row's traceback is
# BAD)


def at(copy, name, start, shift=0):
    """What a traceback through the copy `copy` of `name` shows for the first line of the product
    that begins with `start` (found here, so that an edit of the product moves the expectation)."""
    lines = (ROOT / name).read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.startswith(start)) + shift
    return f'{copy}/{name}", line {number}'


CASES = [
    ("run folder", f"finetune.py {FTR} --out runs/ft", 2, "holds a finished run", ""),
    ("run folder", f"finetune.py {FTR} --out runs/ft --resume", 0, "", ""),
    (
        "run folder",
        f"cp -r runs/ft f1 && finetune.py {FTR} --out f1 --fold 0 --force && ls f1 | tr '\\n' ' '",
        0,
        "model_fold0.pt",
        "model_fold1",
    ),
    ("run folder", "predict.py -i scans -o pred --model runs/ft", 0, "skipped 2", ""),
    (
        "run folder",
        f"cp -r runs/ft f2 && predict.py -i scans -o p2 --model f2 && finetune.py {FTR} --out f2 "
        "--force --seed 1 && predict.py -i scans -o p2 --model f2",
        2,
        "holds a run that read other inputs: f2/model_fold0.pt changed",
        "",
    ),
    ("run folder", "predict.py -i scans -o p2 --model f2 --force", 0, "done 2", ""),
    (
        "run folder",
        f"cp -r runs/ft f3 && rm f3/results.json f3/model_fold2.pt && finetune.py {FTR} --out f3",
        2,
        "unfinished run",
        "",
    ),
    (
        "run folder",
        f"finetune.py {FTR} --out f3 --resume && ls f3 | tr '\\n' ' '",
        0,
        "model_fold2.pt",
        "",
    ),
    ("run folder", f"finetune.py {FTR} --out f3 --resume --lr 0.1", 2, "--lr", ""),
    (
        "run folder",
        f"pretrain.py --data data/demo/unlabelled --out runs/pre --steps 4 {PRE}",
        2,
        "--resume",
        "",
    ),
    (
        "run folder",
        f"pretrain.py --data data/demo/unlabelled --out runs/pre --steps 4 {PRE} --resume --lr 0.1",
        2,
        "--lr",
        "",
    ),
    (
        "run folder",
        "echo 999999 > runs/pre/.lock && pretrain.py --data data/demo/unlabelled --out runs/pre "
        f"--steps 6 {PRE} --resume && test ! -e runs/pre/.lock && echo unlocked",
        0,
        "unlocked",
        "",
    ),
    (
        "run folder",
        f"mkdir -p f4 && (sleep 20 >/dev/null 2>&1 & echo $! > f4/.lock) && finetune.py {FTR} "
        "--out f4",
        2,
        "in use",
        "",
    ),
    (
        "run folder",
        "linear_probe.py --data data/demo --init random --out runs/ft --preset demo",
        2,
        "a run of finetune.py",
        "",
    ),
    ("run folder", "predict.py -i scans -o runs/ft --model runs/ft", 2, "", ""),
    (
        "run folder",
        "touch afile && finetune.py --data data/demo --init random --out afile",
        2,
        "--out afile: cannot be a folder (a file of that name exists)",
        "",
    ),
    (
        "run folder",
        "preprocess.py --input data/demo/raw --output data/demo --modality mri",
        2,
        "",
        "",
    ),
    (
        "run folder",
        "preprocess.py --input data/demo/raw --output data/demo/raw/out --modality ct",
        2,
        "inside",
        "",
    ),
    ("sizes", "pretrain.py --data demo --steps 10000000000000000000000", 2, "<= 1e9", ""),
    (
        "sizes",
        "pretrain.py --data data/demo/unlabelled --preset demo --out s1 --batch-pairs 100000",
        2,
        "GiB",
        "",
    ),
    (
        "sizes",
        "pretrain.py --data data/demo/unlabelled --preset demo --out s2 --patch-size 2048 2048 512",
        2,
        "GiB",
        "",
    ),
    (
        "sizes",
        "pretrain.py --data data/demo/unlabelled --preset demo --out s3 --num-voxels 100000",
        2,
        "voxels",
        "",
    ),
    ("sizes", f"finetune.py {FTR} --out s4 --batch-size 100000", 2, "GiB", ""),
    (
        "sizes",
        f"finetune.py {FTR} --out s5 --eval-patch-size 4096 4096 1024",
        0,
        "mean",
        "",
    ),  # cut to the volume
    (
        "sizes",
        "linear_probe.py --data data/demo --init random --preset demo --out s6 --eval-patch-size "
        "4096 4096 1024",
        0,
        "mean",
        "",
    ),
    ("sizes", "preprocess.py --demo s7 --num-cases 100000000", 2, "", ""),
    ("sizes", "pretrain.py --data demo --workers 100000", 2, "between 0", ""),
    ("sizes", f"finetune.py {FTR} --out s8 --train-cases 100", 2, "--train-cases", ""),
    ("sizes", "pretrain.py --data demo --log-every 0", 2, ">= 1", ""),
    ("sizes", "predict.py -i scans -o s9 --model runs/ft --overlap 1", 2, "[0, 1)", ""),
    (
        "sizes",
        "preprocess.py --input data/demo/raw --output s10 --modality ct --spacing 0.001 0.001 "
        "0.001",
        1,
        "failed 6",
        "",
    ),
    ("sizes", "pretrain.py --data demo --lr inf", 2, "finite", ""),
    (
        "case reader",
        f"cp -r bad c1 && {TRUNC} c1/cases/demo_000/image.npy && finetune.py --data c1 --init "
        f"random --out c1r --base-channels 4 --num-levels 3 --folds 3 {FT}",
        2,
        "re-run preprocess.py",
        "",
    ),
    (
        "case reader",
        "linear_probe.py --data c1 --init random --preset demo --out c1p",
        2,
        "re-run preprocess.py",
        "",
    ),
    (
        "case reader",
        f"pretrain.py --data c1 --out c1q --steps 2 {PRE}",
        2,
        "re-run preprocess.py",
        "",
    ),
    (
        "case reader",
        "cp -r bad c2 && rm c2/cases/demo_001/label.npy && finetune.py --data c2 --init random "
        f"--out c2r --base-channels 4 --num-levels 3 --folds 3 {FT}",
        2,
        "label.npy",
        "",
    ),
    (
        "case reader",
        f"cp -r bad c3 && rm c3/cases/demo_002/meta.json && pretrain.py --data c3 --out c3r "
        f"--steps 2 {PRE}",
        2,
        "demo_002",
        "",
    ),
    (
        "case reader",
        "cp -r bad c4 && echo text > c4/cases/demo_000/body.npy && pretrain.py --data c4 --out "
        f"c4r --steps 2 {PRE}",
        2,
        "body.npy",
        "",
    ),
    (
        "case reader",
        "cp -r bad c5 && python -c \"import numpy; numpy.save('c5/cases/demo_000/image.npy', "
        f'numpy.zeros((4, 4)))" && pretrain.py --data c5 --out c5r --steps 2 {PRE}',
        2,
        "image.npy",
        "",
    ),
    (
        "case reader",
        f"cp -r bad c6 && rm c6/dataset.json && pretrain.py --data c6 --out c6r {PRE}",
        2,
        "dataset.json",
        "",
    ),
    (
        "case reader",
        f"cp -r bad c7 && echo '{{' > c7/dataset.json && pretrain.py --data c7 --out c7r {PRE}",
        2,
        "dataset.json",
        "",
    ),
    (
        "case reader",
        'cp -r bad c8 && echo \'{"train": ["nobody"], "val": [], "test": []}\' > c8/split.json && '
        f"finetune.py --data c8 --init random --split --out c8r {FT}",
        2,
        "nobody",
        "",
    ),
    ("case reader", "pretrain.py --data nowhere", 2, "nowhere", ""),
    (
        "case reader",
        "cp -r bad c9 && rm c9/cases/demo_003/image.npy && linear_probe.py --data c9 --init "
        "random --preset demo --out c9r",
        2,
        "image.npy",
        "",
    ),
    ("flags", f"finetune.py {FTR} --out g1 --folds 5 --split", 2, "--folds", ""),
    (
        "flags",
        f"finetune.py --data data/demo --checkpoint runs/pre --out g2 {FT} --freeze-steps 10",
        2,
        "--freeze-steps",
        "",
    ),
    (
        "flags",
        f"finetune.py --data data/demo --checkpoint runs/pre --out g2 {FT} --ramp-steps 10",
        2,
        "--ramp-steps",
        "",
    ),
    ("flags", f"finetune.py {FTR0} --out g3 --test-data data/demo", 2, "--test-data", ""),
    ("flags", f"cp -r bad g4 && finetune.py {FTR0} --out g4r --test-data g4", 2, "demo_", ""),
    (
        "flags",
        "linear_probe.py --data data/demo --init random --preset demo --out g5 --folds 3 --fold 3",
        2,
        "--fold",
        "",
    ),
    ("flags", f"finetune.py {FTR} --out g6 --freeze-steps 2", 2, "--freeze-steps", ""),
    (
        "flags",
        "pretrain.py --data data/demo/unlabelled --preset demo --out g7 --steps 4 "
        "--warmup-steps 10",
        2,
        "--warmup-steps",
        "",
    ),
    (
        "flags",
        f"finetune.py --data data/demo --checkpoint runs/pre --out g8 {FTC} --base-channels 8",
        2,
        "--base-channels",
        "",
    ),
    (
        "flags",
        f"finetune.py --data data/demo --checkpoint runs/pre --out g9 {FTC} --arch vox2vec",
        2,
        "--arch",
        "",
    ),
    ("flags", "predict.py -i scans -o g10 --model runs/ft --tta", 2, "mirror", ""),
    ("flags", "predict.py -i scans -o g11 --model runs/ft --folds 7", 2, "7", ""),
    ("flags", f"finetune.py {FTR} --out g12 --evaluate-on val", 2, "--evaluate-on", ""),
    ("flags", f"finetune.py {FTR} --out g13 --mirror-axes 0 --aug none", 2, "--mirror-axes", ""),
    ("flags", "preprocess.py --demo g14 --input data/demo/raw", 2, "one of the two", ""),
    (
        "flags",
        "pretrain.py --data data/demo/unlabelled --preset demo --out g15 --split",
        2,
        "split",
        "",
    ),
    (
        "weight files",
        f"finetune.py --data data/demo --checkpoint runs/ft/model_fold0.pt --out w1 {FTC}",
        2,
        "fine-tuned model",
        "",
    ),
    ("weight files", "predict.py -i scans -o w2 --model runs/pre/backbone.pt", 2, "", ""),
    (
        "weight files",
        f"echo text > notes.txt && finetune.py --data data/demo --checkpoint notes.txt --out w3 "
        f"{FTC}",
        2,
        "text file",
        "",
    ),
    (
        "weight files",
        f"{EVIL} && linear_probe.py --data data/demo --checkpoint evil.pt --preset demo --out w4; "
        "test -e pwned && echo CODE RAN || echo no code ran",
        0,
        "no code ran",
        "",
    ),
    (
        "weight files",
        f"cp runs/pre/backbone.pt half.pt && {TRUNC} half.pt && finetune.py --data data/demo "
        f"--checkpoint half.pt --out w5 {FTC}",
        2,
        "half.pt",
        "",
    ),
    (
        "weight files",
        f"finetune.py --data data/demo --checkpoint runs --out w6 {FTC}",
        2,
        "runs",
        "",
    ),
    (
        "weight files",
        f"pretrain.py --data data/demo/unlabelled --out w7 --steps 2 {PRE} --init-from "
        "runs/ft/model_fold0.pt",
        2,
        "fine-tuned model",
        "",
    ),
    (
        "scans",
        "cp -r two x1 && rm x1/imagesTr/demo_002_0001.nii.gz && preprocess.py --input x1 --output "
        "x1p --modality ct --workers 1",
        1,
        "failed 1",
        "",
    ),
    (
        "scans",
        "cp -r two x2 && cp two/imagesTr/demo_000_0001.nii.gz x2/imagesTr/demo_000_0002.nii.gz && "
        "preprocess.py --input x2 --output x2p --modality ct --workers 1",
        1,
        "failed 1",
        "",
    ),
    (
        "scans",
        "cp -r two x3 && cp scans/demo_000.nii.gz x3/imagesTr/demo_003_0001.nii.gz && "
        "preprocess.py --input x3 --output x3p --modality ct --workers 1",
        1,
        "failed 1",
        "",
    ),
    (
        "scans",
        "mkdir -p x4 && echo garbage > x4/a.nii.gz && cp scans/demo_000.nii.gz x4/ && "
        "preprocess.py --input x4 --output x4p --modality ct --workers 1",
        1,
        "failed 1",
        "",
    ),
    ("scans", "predict.py -i nowhere -o x5 --model runs/ft", 2, "nowhere", ""),
    ("scans", "predict.py -i scans -o scans/out --model runs/ft", 2, "", ""),
    (
        "scans",
        "mkdir -p x6 && cp scans/* x6/ && echo garbage > x6/bad.nii.gz && predict.py -i x6 -o x6p "
        "--model runs/ft",
        1,
        "",
        "",
    ),
    ("scans", "predict.py -i two/imagesTr -o x7 --model runs/ft", 2, "channel", ""),
    ("lab", "experiments/compare.py missing", 2, "not a results.json", ""),
    ("lab", "experiments/diagnostics.py", 2, "give --backbone", ""),
    ("lab", "experiments/convert.py --inspect nowhere.pt", 2, "nowhere.pt", ""),
    (
        "lab",
        "echo text > notes.txt && experiments/convert.py --inspect notes.txt",
        2,
        "text file",
        "",
    ),
    ("lab", "experiments/convert.py --inspect runs/pre/backbone.pt", 0, "", ""),
    (
        "lab",
        "touch afile && experiments/evidence.py --data data/demo --unlabelled "
        "data/demo/unlabelled --out afile --quick",
        2,
        "afile",
        "",
    ),
    (
        "lab",
        "experiments/pretrain_curve.py --data demo --keep-steps 100 --steps 4 --out l1",
        2,
        "--keep-steps",
        "",
    ),
    (
        "lab",
        "experiments/finetune_curve.py --data data/demo --init random --out l2 --eval-every 0",
        2,
        ">= 1",
        "",
    ),
    ("lab", "experiments/bench.py --steps -1", 2, "", ""),
    # ---- pass six (issue "Facts, not names"): whose error it is
    (
        "whose error",
        "cp -r repo e1 && sed -i 's/^    n = z_a.shape\\[0\\]$/    n = z_a.shape[0]; "
        "np.zeros(8192).reshape(7)/' e1/loss.py && python e1/pretrain.py --data "
        f"data/demo/unlabelled --out e1r --steps 2 {PRE}",
        1,
        "ValueError: cannot reshape array of size 8192 into shape (7,)",
        "",
        at("e1", "loss.py", "    n = z_a.shape[0]"),
    ),
    (
        "whose error",
        "cp -r repo e2 && sed -i 's/^    best = None$/    best = None; lo, hi = shape/' "
        "e2/data.py && python e2/pretrain.py --data data/demo/unlabelled --out e2r --steps 2 "
        f"{PRE}",
        1,
        "ValueError: too many values to unpack (expected 2)",
        "",
        at("e2", "data.py", "    best = None"),
    ),
    (
        "whose error",
        "cp -r repo e3 && sed -i 's/^    best = None$/    best = None; lo, hi = shape/' "
        "e3/data.py && python e3/pretrain.py --data data/demo/unlabelled --out e3r --steps 2 "
        f"{PRE} --workers 2",
        1,
        "ValueError: too many values to unpack (expected 2)",
        "",
        at("e3", "data.py", "    best = None"),
    ),
    (
        "whose error",
        "cp -r repo e4 && sed -i 's/^    classes = \\[ckpts/    open(out_dir \\/ "
        '"predictons.json"); classes = [ckpts/\' e4/predict.py && python e4/predict.py -i scans '
        "-o e4r --model runs/ft",
        1,
        "FileNotFoundError",
        "FAILED",
        at("e4", "predict.py", "    classes = [ckpts"),
    ),
    (
        "whose error",
        "cp -r repo e5 && sed -i 's/^    preset = make_preset(modality, spacing)$/    preset = "
        "make_preset(modality, "
        'spacing)["nmae"]/\' e5/transform.py && python e5/preprocess.py --input data/demo/raw '
        "--output e5r --modality ct "
        "--workers 2",
        1,
        "KeyError: 'nmae'",
        "FAILED",
        at("e5", "transform.py", "    preset = make_preset(modality, spacing)"),
    ),
    (
        "whose error",
        "cp -r repo e6 && sed -i 's/^        x = local_pixel_shuffle(x, generator)$/        x = "
        "local_pixel_shuffle(x, generator) * math.sqrt(-1)/' e6/augment.py && "
        "sed -i '/^import torch$/i import math' e6/augment.py && "
        "python e6/pretrain.py --data data/demo/unlabelled --out e6r "
        f"--steps 2 {PRE}",
        1,
        "ValueError: math domain error",
        "",
        at("e6", "augment.py", "        x = local_pixel_shuffle(x, generator)", shift=1),
    ),
    (
        "whose error",
        f"cp -r bad w7 && {TRUNC} w7/cases/demo_002/image.npy && pretrain.py --data w7 --out w7r "
        f"--steps 2 {PRE} --workers 2",
        2,
        "demo_002/image.npy: unreadable",
        "",
        "",
    ),
    # files by record
    (
        "files by record",
        "cp -r runs/pre r1 && cp r1/backbone.pt r1/backbone_best_keep.pt && cp r1/backbone.pt "
        "r1/backbone_authors_ct.pt && pretrain.py --data data/demo/unlabelled --out r1 --steps 2 "
        f"{PRE} --force && ls r1 | tr '\\n' ' '",
        0,
        "backbone_authors_ct.pt backbone_best_keep.pt",
        "",
        "",
    ),
    (
        "files by record",
        "cp -r runs/ft r2 && cp r2/model_fold0.pt r2/model_fold0_v1.pt && cp r2/model_fold0.pt "
        f"r2/model_fold0_nnunet_best.pt && finetune.py {FTR} --out r2 --force && ls r2 | tr '\\n' "
        "' '",
        0,
        "model_fold0_nnunet_best.pt model_fold0_v1.pt",
        "",
        "",
    ),
    (
        "files by record",
        "cp -r data/demo/raw r3 && predict.py -i r3/imagesTr -o r3/labelsTr --model runs/ft",
        2,
        "demo_000.nii.gz is there and no run's record lists it",
        "",
        "",
    ),
    (
        "files by record",
        "mkdir -p r4 && echo '{}' > r4/dataset.json && preprocess.py --input data/demo/raw "
        "--output r4 --modality ct",
        2,
        "dataset.json is there and no run's record lists it",
        "",
        "",
    ),
    (
        "files by record",
        f"mkdir -p r5 && echo mine > r5/notes.txt && finetune.py {FTR} --out r5 && ls r5 | tr "
        "'\\n' ' '",
        0,
        "notes.txt",
        "",
        "",
    ),
    (
        "files by record",
        f"mkdir -p r6 && echo mine > r6/results.json && finetune.py {FTR} --out r6",
        2,
        "results.json is there and no run's record lists it",
        "unfinished",
        "",
    ),
    (
        "files by record",
        f"mkdir -p r7 && echo mine > r7/results.json && finetune.py {FTR} --out r7 --force",
        2,
        "results.json is there and no run's record lists it",
        "",
        "",
    ),
    (
        "files by record",
        "experiments/convert.py --export-reference runs/pre/backbone.pt runs/pre/log.jsonl",
        2,
        "exists; choose another file name",
        "",
        "",
    ),
    (
        "files by record",
        f"cp -r runs/pre r8 && echo mine > r8/.tmp-1-checkpoint.pt && pretrain.py --data "
        f"data/demo/unlabelled --out r8 --steps 2 {PRE} --force && cat r8/.tmp-1-checkpoint.pt",
        0,
        "mine",
        "",
        "",
    ),
    (
        "files by record",
        "cp -r pred r9 && echo mine > r9/notes.txt && predict.py -i scans -o r9 --model runs/ft "
        "--force && cat r9/notes.txt",
        0,
        "mine",
        "",
        "",
    ),
    # inputs by content
    (
        "inputs by content",
        f"cp -r data/demo/unlabelled i1 && pretrain.py --data i1 --out i1r --steps 2 {PRE} && "
        f"{NAN} i1/cases/unlabelled_001/image.npy && pretrain.py --data i1 --out i1r --steps 4 "
        f"{PRE} --resume",
        2,
        "i1/cases/unlabelled_001/image.npy: a non-finite voxel",
        "",
        "",
    ),
    (
        "inputs by content",
        f"cp -r data/demo/unlabelled i0 && pretrain.py --data i0 --out i0r --steps 2 {PRE} && "
        f"{HALF} i0/cases/unlabelled_001/image.npy && pretrain.py --data i0 --out i0r --steps 4 "
        f"{PRE} --resume",
        2,
        "i0/cases/unlabelled_001 changed",
        "",
        "",
    ),
    (
        "inputs by content",
        f"cp -r data/demo/unlabelled i2 && pretrain.py --data i2 --out i2r --steps 2 {PRE} && "
        "touch i2/cases/unlabelled_002/body.npy && pretrain.py --data i2 --out i2r --steps 4 "
        f"{PRE} --resume",
        2,
        "unlabelled_002 changed",
        "",
        "",
    ),
    (
        "inputs by content",
        "cp -r data/demo/raw i3 && preprocess.py --input i3 --output i3p --modality ct --workers "
        "1 && cp i3/imagesTr/demo_001.nii.gz i3/imagesTr/demo_000.nii.gz && cp "
        "i3/labelsTr/demo_001.nii.gz i3/labelsTr/demo_000.nii.gz && preprocess.py --input i3 "
        "--output i3p --modality ct --workers 1",
        0,
        "done 1 / skipped 5 / failed 0",
        "",
        "",
    ),
    (
        "inputs by content",
        "preprocess.py --input i3 --output i3p --modality ct --workers 1 --force",
        0,
        "done 6 / skipped 0 / failed 0",
        "",
        "",
    ),
    (
        "inputs by content",
        "preprocess.py --input two --output i3p --modality ct --workers 1",
        2,
        "holds a run with other settings (--channels",
        "",
        "",
    ),
    (
        "inputs by content",
        "cp -r scans i4 && predict.py -i i4 -o i4p --model runs/ft && cp i4/demo_001.nii.gz "
        "i4/demo_000.nii.gz && predict.py -i i4 -o i4p --model runs/ft",
        0,
        "done 1 / skipped 1 / failed 0",
        "",
        "",
    ),
    (
        "inputs by content",
        f"cp -r runs/pre i5b && finetune.py --data data/demo --checkpoint i5b {FTC0} --out i5 && "
        f"pretrain.py --data data/demo/unlabelled --out i5b --steps 2 {PRE} --force --seed 3 && "
        f"finetune.py --data data/demo --checkpoint i5b {FTC0} --out i5 --resume",
        2,
        "i5b changed",
        "",
        "",
    ),
    (
        "inputs by content",
        "cp -r bad i6 && finetune.py --data i6 --init random --base-channels 4 --num-levels 3 "
        f"--folds 3 {FT} --out i6r && {LABEL9} i6/cases/demo_003/label.npy && finetune.py --data "
        f"i6 --init random --base-channels 4 --num-levels 3 --folds 3 {FT} --out i6r --resume",
        2,
        "label value 12",
        "",
        "",
    ),
    (
        "inputs by content",
        f"cp -r runs/ft i7 && predict.py -i scans -o i7p --model i7 && finetune.py {FTR} --out i7 "
        "--force --seed 2 && predict.py -i scans -o i7p --model i7",
        2,
        "holds a run that read other inputs: i7/model_fold0.pt changed",
        "",
        "",
    ),
    # numbers as facts
    (
        "numbers",
        f"finetune.py {FTR0} --out n1 --lr 1e30; ls n1 | tr '\\n' ' '",
        0,
        "",
        "model_fold",
        "",
    ),
    (
        "numbers",
        f"finetune.py {FTR0} --out n2 --lr 1e30",
        1,
        "non-finite loss between steps 1 and 3",
        "",
        "",
    ),
    (
        "numbers",
        f"pretrain.py --data data/demo/unlabelled --out n3 --steps 3 {PRE} --lr 1e30 --log-every 1",
        1,
        "non-finite loss",
        "",
        "",
    ),
    (
        "numbers",
        f"{NANPT} runs/ft/model_fold0.pt nanmodel.pt && predict.py -i scans -o n4 --model "
        "nanmodel.pt",
        2,
        "not finite",
        "",
        "",
    ),
    (
        "numbers",
        f"{NANPT} runs/pre/backbone.pt nanbb.pt && linear_probe.py --data data/demo --checkpoint "
        "nanbb.pt --preset demo --out n5",
        2,
        "a diverged backbone",
        "",
        "",
    ),
    (
        "numbers",
        f"cp -r bad n6 && {NAN} n6/cases/demo_004/image.npy && finetune.py --data n6 --init random "
        f"--base-channels 4 --num-levels 3 --folds 3 {FT} --out n6r",
        2,
        "demo_004/image.npy: a non-finite voxel (nan",
        "",
        "",
    ),
    ("numbers", f"pretrain.py --data n6 --out n7 --steps 2 {PRE}", 2, "a non-finite voxel", "", ""),
    (
        "numbers",
        f"cp -r bad n8 && {LABEL9} n8/cases/demo_005/label.npy && linear_probe.py --data n8 --init "
        "random --preset demo --out n8r",
        2,
        "demo_005/label.npy: label value 12, not a class",
        "",
        "",
    ),
    (
        "numbers",
        f"cp -r bad n9 && {NOBODY} n9/cases/demo_001/body.npy && pretrain.py --data n9 --out n9r "
        f"--steps 2 {PRE}",
        2,
        "demo_001/body.npy: no body voxel",
        "",
        "",
    ),
    (
        "numbers",
        "cp -r bad n10 && python -c \"import json; p = 'n10/dataset.json'; d = "
        "json.load(open(p)); d['labels'].pop('8'); json.dump(d, open(p, 'w'))\" && finetune.py "
        f"--data n10 --init random --base-channels 4 --num-levels 3 --folds 3 {FT} --out n10r",
        2,
        "label value 8, not a class",
        "",
        "",
    ),
    # two inputs compared before work
    (
        "two inputs",
        "preprocess.py --input two --output t2p --modality ct --workers 1 && preprocess.py "
        "--input one --output t1p --modality ct --workers 1 && finetune.py --data t2p --test-data "
        f"t1p --init random {FT} --out t1",
        2,
        "its preprocessing",
        "",
        "",
    ),
    (
        "two inputs",
        "preprocess.py --input one --output t3p --modality mri --workers 1 && finetune.py --data "
        f"t1p --test-data t3p --init random {FT} --out t3",
        2,
        "its preprocessing",
        "",
        "",
    ),
    (
        "two inputs",
        "linear_probe.py --data t2p --test-data t1p --init random --preset demo --out t4",
        2,
        "its preprocessing",
        "",
        "",
    ),
    (
        "two inputs",
        "cp -r t1p t5p && python -c \"import json; p = 't5p/dataset.json'; d = "
        "json.load(open(p)); d['labels']['1'] = 'lung'; json.dump(d, open(p, 'w'))\" && "
        f"finetune.py --data t1p --test-data t5p --init random {FT} --out t5",
        2,
        "its classes",
        "",
        "",
    ),
    (
        "two inputs",
        "cp -r two t6 && python -c \"import json; p = 't6/dataset.json'; d = json.load(open(p)); "
        "d['channel_names']['1'] = 'T1'; json.dump(d, open(p, 'w'))\" && finetune.py --data t2p "
        f"--init random {FT} --out t6m --folds 2 --fold 0 && predict.py -i t6/imagesTr -o t6r "
        "--model t6m",
        2,
        "names the channels ['CT', 'T1'], the models were trained on ['CT', 'T2']",
        "",
        "",
    ),
    # flags and paths (kinds of this pass's own)
    (
        "flags",
        f"finetune.py {FTR} --out f5 --aug nnunet-like --mirror-axes 1 1",
        2,
        "an axis given twice",
        "",
        "",
    ),
    (
        "flags",
        "predict.py -i scans -o f6 --model runs/ft --folds 0 0",
        2,
        "a fold given twice",
        "",
        "",
    ),
    (
        "flags",
        f"pretrain.py --data data/demo/unlabelled --out f7 --steps 2 {PRE} --device cuda:3",
        2,
        "--device cuda:3: not a device of this machine",
        "",
        "",
    ),
    (
        "paths",
        "touch afile && linear_probe.py --data data/demo --init random --preset demo --out p1 "
        "--cache-dir afile",
        2,
        "--cache-dir afile: cannot be a folder",
        "",
        "",
    ),
    (
        "paths",
        "touch afile && predict.py -i scans -o afile --model runs/ft",
        2,
        "-o afile: cannot be a folder",
        "",
        "",
    ),
    (
        "paths",
        f"touch afile && pretrain.py --data data/demo/unlabelled --out afile --steps 2 {PRE}",
        2,
        "--out afile: cannot be a folder",
        "",
        "",
    ),
    (
        "paths",
        f"finetune.py --data data/demo --init random --split data --out p2 {FT}",
        2,
        "--split data: cannot be read",
        "",
        "",
    ),
    (
        "paths",
        f"finetune.py --data data/demo --checkpoint runs/ft/model_fold0 {FTC} --out p3",
        2,
        "does not exist",
        "",
        "",
    ),
    ("paths", "predict.py -i scans/demo_000 -o p4 --model runs/ft", 2, "does not exist", "", ""),
]


SHORT = [
    ("$FTR", FTR),
    ("$FTR0", FTR0),
    ("$FTC0", FTC0),
    ("$FTC", FTC),
    ("$FT", FT),
    ("$PRE", PRE),
    ("$TRUNC", TRUNC),
    ("$EVIL", EVIL),
    ("$NANPT", NANPT),
    ("$NAN", NAN),
    ("$LABEL9", LABEL9),
    ("$HALF", HALF),
    ("$NOBODY", NOBODY),
]


def shortened(command):
    """A command as the table shows it: the flag sets above by their names."""
    for name, text in SHORT:
        command = command.replace(text, name)
    return command


def run(command, work, timeout):
    """-> (exit code, last non-empty line of stdout + stderr, the whole output)."""
    real = re.sub(
        SCRIPTS,
        lambda m: f"{sys.executable} {ROOT / m[1]}" if (ROOT / m[1]).is_file() else m[1],
        command,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHON=sys.executable)
    real = re.sub(r"(^|&& |; )python ", rf"\1{sys.executable} ", real).replace("$REPO", str(ROOT))
    try:
        p = subprocess.run(
            ["bash", "-c", real],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return 124, f"(no end within {timeout} s)", ""
    text = p.stdout.replace("\r", "\n")
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and "it/s]" not in line and "s/it]" not in line
    ]
    return p.returncode, (lines[-1] if lines else ""), text


def main(args):
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        raise InputError(f"--work {work}: not empty (the table starts from a fresh folder)")
    work.mkdir(parents=True, exist_ok=True)
    for command in SETUP:
        code, last, _ = run(command, work, 600)
        if code:
            raise InputError(f"setup `{command}` failed ({code}): {last}")
    rows, bad = [], 0
    for i, (kind, command, code, words, never, *trace) in enumerate(CASES[: args.limit or None], 1):
        t = time.time()
        got, last, text = run(command, work, args.timeout)
        traceback = "Traceback (most recent call last)" in text
        expected = trace[0] if trace and trace[0] else None
        ok = (
            got == code
            and words in last
            and not (never and never in text)
            and (traceback and expected in text if expected else not traceback)
        )
        bad += not ok
        shown = (
            last.replace(str(work) + "/", "").replace(str(ROOT) + "/", "").replace("|", "\\|")[:220]
        )
        cell = shortened(command).replace("|", "\\|")
        verdict = (
            "good" + (" (traceback names the file and line)" if expected and ok else "")
            if ok
            else "BAD" + (" (traceback)" if traceback and not expected else "")
        )
        rows.append(f"| {i} | {kind} | `{cell}` | {got} | {shown} | {verdict} |")
        print(
            f"{i:3d} {kind:12s} exit {got} ({code} expected) {'good' if ok else 'BAD'} "
            f"{time.time() - t:5.1f} s: {shown}"
        )
    table = [
        "| # | kind | command | exit | last line | verdict |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    names = [f"- `{name}` = `{text}`" for name, text in SHORT]
    report = "\n".join(
        [
            f"{len(rows) - bad} good, {bad} bad of {len(rows)} (`python experiments/hostile.py "
            f"--work W`). Setup, in the work folder: `{shortened('; '.join(SETUP))}`; then",
            *names,
            "",
            *table,
            "",
        ]
    )
    if args.out:
        with runtime.atomic(args.out) as tmp:
            tmp.write_text(report)
    print(f"{len(rows) - bad} good, {bad} bad of {len(rows)}")
    shutil.rmtree(work) if args.clean else None
    return 1 if bad else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--work", required=True, help="an empty or new folder where the commands run")
    p.add_argument("--out", help="the markdown table")
    p.add_argument(
        "--limit", type=non_negative_int, default=0, help="only the first N rows (0: all)"
    )
    p.add_argument("--timeout", type=runtime.positive_int, default=240, help="seconds per row")
    p.add_argument("--clean", action="store_true", help="delete --work at the end")
    return runtime.parse(p, argv)


if __name__ == "__main__":
    runtime.cli(main, parse_args)
