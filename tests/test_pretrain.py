"""pretrain.py: a few real training steps on CPU, resume == uninterrupted, non-finite stop, the demo
command end to end, the presets and the rules a run cannot honour, sizes bounded before any work,
one run per folder, Ctrl-C, and torchrun with gloo."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import pretrain
import runtime
from data import InputError
from model import FPN3d

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--base-channels",
    "4",
    "--num-levels",
    "3",
    "--patch-size",
    "16",
    "16",
    "8",
    "--batch-pairs",
    "2",
    "--num-voxels",
    "32",
    "--workers",
    "0",
    "--log-every",
    "1",
]


def run(data_dir, out, *extra):
    return pretrain.main(
        pretrain.parse_args(["--data", str(data_dir), "--out", str(out), *TINY, *extra])
    )


def read_log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def test_steps_train_every_part(small_demo, tmp_path):
    setup = pretrain.setup(
        pretrain.parse_args(["--data", str(small_demo), "--out", str(tmp_path), *TINY])
    )
    model = setup.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step, batch in zip(range(3), setup.loader):
        loss, parts = pretrain.training_step(model, batch, setup.cfg, g, torch.device("cpu"), None)
        assert torch.isfinite(loss) and set(parts) == {"loss_contrastive", "loss_recon"}
        assert all(torch.isfinite(p) for p in parts.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    weights = [k for k in before if k.endswith("weight")]
    unchanged = [k for k in weights if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    assert any(
        k.startswith("projections.") for k in weights
    )  # the balanced projections are registered


def test_resume_reproduces_uninterrupted_run(small_demo, tmp_path):
    run(small_demo, tmp_path / "full", "--steps", "4", "--checkpoint-every", "2")
    run(small_demo, tmp_path / "split", "--steps", "2", "--checkpoint-every", "2")
    run(small_demo, tmp_path / "split", "--steps", "4", "--checkpoint-every", "2", "--resume")
    full, split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(full, split):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
    sa = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_resume_truncates_the_log_to_the_checkpoint(small_demo, tmp_path):
    """A run killed after logging steps past its last checkpoint logs them once, not twice."""
    run(small_demo, tmp_path, "--steps", "3", "--checkpoint-every", "2")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["step"] = 2  # as if killed after logging step 3
    torch.save(state, tmp_path / "checkpoint.pt")
    run(small_demo, tmp_path, "--steps", "4", "--checkpoint-every", "2", "--resume")
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--lr", "0.1", "--lr 0.0003 -> 0.1"),
        ("--recon-weight", "3", "--recon-weight 10.0 -> 3.0"),
        ("--base-channels", "8", "--base-channels 4 -> 8"),
        ("--seed", "5", "--seed 0 -> 5"),
    ],
)
def test_resume_refuses_changed_settings(small_demo, tmp_path, flag, value, words):
    run(small_demo, tmp_path, "--steps", "1")
    with pytest.raises(InputError, match=f"holds a run with other settings \\({words}\\)"):
        run(small_demo, tmp_path, "--steps", "2", "--resume", flag, value)


def test_resume_refuses_the_same_cases_in_another_folder(small_demo, tmp_path):
    import shutil

    run(small_demo, tmp_path / "run", "--steps", "1")
    copy = tmp_path / "copy"
    shutil.copytree(small_demo, copy, ignore=shutil.ignore_patterns("raw", "unlabelled"))
    with pytest.raises(InputError, match="other settings \\(--data "):
        run(copy, tmp_path / "run", "--steps", "2", "--resume")


def test_existing_run_folder_is_not_overwritten(small_demo, tmp_path):
    run(small_demo, tmp_path, "--steps", "1")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(InputError, match="holds a finished run .*continue it with --resume"):
        run(small_demo, tmp_path, "--steps", "1")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"} == before


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--steps", "0"], "argument --steps: must be >= 1 and <= 1e9"),
        (
            ["--steps", "10000000000000000000000"],
            "argument --steps: must be >= 1 and <= 1e9, got 1e+22",
        ),
        (["--num-voxels", "0"], "argument --num-voxels: must be >= 1"),
        (
            ["--num-voxels", "5000"],
            "--num-voxels 5000 is more than a 16x16x8 patch holds (2048 voxels)",
        ),
        (
            ["--steps", "3", "--warmup-steps", "3"],
            "--warmup-steps 3 is not shorter than --steps 3: the lr would never reach",
        ),
        (["--recon-weight", "0", "--contrastive-weight", "0"], "both 0: nothing to train"),
        (
            ["--resume", "--force"],
            "--resume continues the run in --out, --force replaces it: give one",
        ),
        (["--resume", "--init-from", "x.pt"], "--init-from has no effect with --resume"),
    ],
)
def test_what_a_run_cannot_honour_is_refused_where_flags_are_parsed(
    small_demo, tmp_path, flags, words, capsys
):
    with pytest.raises(SystemExit) as e:
        run(small_demo, tmp_path / "run", *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and words in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "run").exists()


def test_a_step_that_cannot_fit_is_refused_before_any_work(small_demo, tmp_path):
    with pytest.raises(
        InputError,
        match=r"a step of 100000 pairs of 16x16x8 patches needs at least [\d.]+ GiB, more "
        r"than this machine's [\d.]+ GiB of memory",
    ):
        run(small_demo, tmp_path / "run", "--batch-pairs", "100000")
    assert not (tmp_path / "run").exists()


def test_the_schedule_is_never_materialised():
    """The data order of a billion-step run costs nothing before it starts (a lazy range): step s
    of rank r of W reads items s * W * b + r + W * j, so W ranks together read one rank's items."""
    order = data.step_loader([], 10**9, 4, rank=1, world=2, start=3).sampler
    assert len(order) == (10**9 - 3) * 4
    assert list(zip(range(6), order)) == list(enumerate([25, 27, 29, 31, 33, 35]))
    ranks = [data.step_loader([], 5, 4, rank=r, world=2, start=3).sampler for r in (0, 1)]
    assert sorted([*ranks[0][:4], *ranks[1][:4]]) == list(
        data.step_loader([], 5, 8, start=3).sampler[:8]
    )


def test_crafted_checkpoint_is_refused_on_resume(small_demo, tmp_path):
    """--resume loads checkpoint.pt with weights_only=True: a pickle that runs code is refused."""
    import pickle

    run(small_demo, tmp_path, "--steps", "1")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"version": 2, "x": Evil()}))
    with pytest.raises(
        InputError, match="checkpoint.pt could not be read safely: it holds objects other than"
    ):
        run(small_demo, tmp_path, "--steps", "2", "--resume")
    assert not marker.exists()


def test_init_from_reference_weights(small_demo, tmp_path):
    """--init-from takes the authors' layout; the FPN size comes from the file."""
    import weights

    config = dict(in_channels=1, base_channels=4, num_levels=3)
    start = FPN3d(**config).state_dict()
    torch.save(weights.to_reference(start, config), tmp_path / "released.pt")
    out = tmp_path / "run"
    pretrain.main(
        pretrain.parse_args(
            [
                "--data",
                str(small_demo),
                "--out",
                str(out),
                *TINY[4:],
                "--steps",
                "1",
                "--init-from",
                str(tmp_path / "released.pt"),
                "--lr",
                "0",
            ]
        )
    )
    saved = torch.load(out / "backbone.pt", weights_only=True)
    assert saved["backbone_config"] == config
    assert torch.equal(saved["state_dict"]["stem.weight"], start["stem.weight"])  # lr 0: unchanged


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(small_demo, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pretrain.info_nce

    def poisoned(za, zb, t, valid=None):
        calls["n"] += 1
        return real(za, zb, t, valid) * (float("nan") if calls["n"] >= 3 else 1.0)

    monkeypatch.setattr(pretrain, "info_nce", poisoned)
    with pytest.raises(
        runtime.Diverged,
        match=f"between steps 3 and 3; stopping. The last good checkpoint is "
        f"{tmp_path / 'checkpoint.pt'}",
    ):
        run(small_demo, tmp_path, "--steps", "5", "--checkpoint-every", "2")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_demo_command_reads_the_demos_pretraining_corpus(
    demo_is_small, tmp_path, capsys, monkeypatch
):
    """`--data demo` is the demo's unlabelled corpus (data/demo/unlabelled) with the demo preset."""
    read = []
    real = data.read_case
    monkeypatch.setattr(
        data,
        "read_case",
        lambda d, c, *a, **k: read.append(Path(d).resolve()) or real(d, c, *a, **k),
    )
    run_dir = pretrain.main(
        pretrain.parse_args(
            [
                "--data",
                "demo",
                "--steps",
                "2",
                "--out",
                str(tmp_path),
                "--workers",
                "0",
                "--num-voxels",
                "64",
            ]
        )
    )
    printed = capsys.readouterr().out
    assert "config:" in printed and '"base_channels": 16' in printed  # the demo preset was used
    assert read and set(read) == {(Path(demo_is_small) / "unlabelled").resolve()}
    rows = read_log(run_dir)
    assert rows[-1]["step"] == 2
    assert {"step", "loss", "loss_contrastive", "loss_recon", "lr", "seconds"} <= set(rows[-1])
    backbone = torch.load(
        run_dir / "backbone.pt", weights_only=True
    )  # what the downstream stages do
    net = FPN3d(**backbone["backbone_config"])
    net.load_state_dict(backbone["state_dict"])
    assert backbone["pretrain_config"]["steps"] == 2


def test_demo_not_built_yet_says_which_command_builds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEMO_DIR", tmp_path / "nowhere")
    with pytest.raises(
        InputError,
        match="--data demo: .* is not built yet; run `python preprocess.py --demo data/demo`",
    ):
        pretrain.main(
            pretrain.parse_args(["--data", "demo", "--out", str(tmp_path / "r"), "--steps", "1"])
        )


def test_presets():
    args = pretrain.parse_args(["--data", "x", "--method", "vox2vec"])
    assert (
        args.arch,
        args.aug,
        args.recon_weight,
        args.base_channels,
        args.num_levels,
        args.steps,
    ) == ("vox2vec", "vox2vec", 0.0, 16, 6, 50_000)
    assert (
        pretrain.parse_args(
            ["--data", "x", "--method", "vox2vec", "--recon-weight", "10"]
        ).recon_weight
        == 10.0
    )
    args = pretrain.parse_args(["--data", "demo", "--steps", "7"])
    assert (
        args.steps == 7 and args.base_channels == pretrain.DEMO_ARCHS["balanced"]["base_channels"]
    )
    assert (
        pretrain.parse_args(["--data", "demo", "--method", "vox2vec"]).base_channels
        == pretrain.DEMO_ARCHS["vox2vec"]["base_channels"]
    )


@pytest.mark.parametrize("make", ["missing", "empty", "old_version"])
def test_bad_data_folder_is_a_clear_error(tmp_path, make):
    folder = tmp_path / "data"
    if make != "missing":
        folder.mkdir()
    if make == "old_version":
        (folder / "dataset.json").write_text(json.dumps(dict(format_version=0, cases=[])))
    with pytest.raises(InputError, match=str(folder)):
        pretrain.main(
            pretrain.parse_args(["--data", str(folder), "--out", str(tmp_path / "run"), *TINY])
        )


def test_two_runs_into_one_folder_and_ctrl_c(small_demo, tmp_path):
    """Two pretrain.py processes into one --out: the second is refused with one line while the
    first runs, and the first's log holds its own rows only, in order. Ctrl-C then ends the first
    with one line, and the folder is free again."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "pretrain.py"),
        "--data",
        str(small_demo),
        "--out",
        str(out),
        *TINY,
        "--checkpoint-every",
        "2",
    ]
    log = (tmp_path / "first.err").open("w")  # a file, not a pipe: tqdm would fill a pipe and block
    first = subprocess.Popen(
        [*cmd, "--steps", "100000", "--seed", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(
        [*cmd, "--steps", "40", "--seed", "2", "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    first.send_signal(signal.SIGINT)
    first.wait(timeout=120)
    first_err = (tmp_path / "first.err").read_text().replace("\r", "\n")
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert (
        second.stderr.strip()
        .splitlines()[-1]
        .startswith(f"pretrain.py: error: {out} is in use by another run (pid")
    )
    assert first.returncode == 1 and "Traceback" not in first_err
    assert first_err.strip().splitlines()[-1] == (
        "pretrain.py: interrupted; the last checkpoint is kept: the same "
        "command with --resume continues"
    )
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows
    assert not (out / ".lock").exists()  # released


def test_torchrun_two_processes_gloo(small_demo, tmp_path):
    """DDP on CPU: two ranks, a few steps; rank 0 alone writes; the checkpoint resumes in one
    process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "pretrain.py"),
        "--data",
        str(small_demo),
        "--out",
        str(tmp_path),
        *TINY,
        "--steps",
        "3",
        "--batch-pairs",
        "4",
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer: no duplicated rows
    assert all(r["loss"] == r["loss"] for r in rows)  # finite (not NaN)
    run(small_demo, tmp_path, "--steps", "4", "--batch-pairs", "4", "--device", "cpu", "--resume")
    assert read_log(tmp_path)[-1]["step"] == 4


def test_fast_path_matches_plain_reference_path(small_demo, tmp_path):
    """The speed work changes no result: (1) the sampler's intersection-box bookkeeping picks the
    same voxels as the reference's whole-volume computation for the same random draws, and (2)
    the training step (channels_last, one forward for both views) gives the plain step's loss."""
    import copy
    import numpy as np
    from augment import augment_batch
    from loss import hybrid_loss, info_nce, reconstruction_loss

    case = data.read_case(small_demo, data.list_cases(data.read_dataset(small_demo)[1])[0])
    image, body, patch, n = case["image"][0], case["body"], np.array([16, 16, 8]), 64
    for seed in range(5):
        fast = data.sample_pair(image, body, patch, n, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)  # the same draws, done naively
        anchor = data.sample_anchor(body, rng)
        lo, hi = data.start_range(anchor, np.array(image.shape), patch)
        sa, sb = rng.integers(lo, hi + 1), rng.integers(lo, hi + 1)
        voxels = np.argwhere(np.asarray(body))  # every body voxel of the scan
        inside = np.all(
            (voxels >= sa) & (voxels < sa + patch) & (voxels >= sb) & (voxels < sb + patch), axis=1
        )
        candidates = voxels[inside]
        assert len(candidates) >= n  # (no retry happened)
        chosen = candidates[rng.choice(len(candidates), n, replace=False)]
        np.testing.assert_array_equal(fast["coords_a"], chosen - sa)
        np.testing.assert_array_equal(fast["coords_b"], chosen - sb)

    setup = pretrain.setup(
        pretrain.parse_args(["--data", str(small_demo), "--out", str(tmp_path), *TINY])
    )
    model = setup.model.eval()  # eval: BN uses fixed statistics
    fast_model = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    batch = next(iter(setup.loader))
    fast_loss = pretrain.training_step(
        fast_model, batch, setup.cfg, torch.Generator().manual_seed(1), torch.device("cpu"), None
    )[0]
    g, cfg = torch.Generator().manual_seed(1), setup.cfg
    xa, xb = batch["patches_a"], batch["patches_b"]
    za, ra = model(augment_batch(xa, g, cfg["aug"]), batch["coords_a"])  # each view on its own
    zb, rb = model(augment_batch(xb, g, cfg["aug"]), batch["coords_b"])
    plain = hybrid_loss(
        info_nce(za, zb, cfg["temperature"]),
        reconstruction_loss(ra, xa, rb, xb),
        cfg["recon_weight"],
        cfg["contrastive_weight"],
    )
    torch.testing.assert_close(fast_loss, plain, rtol=1e-4, atol=1e-5)


def test_split_pretrains_on_the_training_pool_only(small_demo, tmp_path, monkeypatch):
    """--split FILE (the control of experiments/evidence.py): pretraining reads the split's training
    cases and never a validation or test case; the cases are part of the run's config."""
    split = json.loads((Path(small_demo) / "split.json").read_text())
    read = []
    real = data.read_case
    monkeypatch.setattr(
        data, "read_case", lambda d, c, *a, **k: read.append(c) or real(d, c, *a, **k)
    )
    run(small_demo, tmp_path, "--steps", "4", "--split")
    assert read and set(read) <= set(split["train"])
    cfg = torch.load(tmp_path / "backbone.pt", weights_only=True)["pretrain_config"]
    assert cfg["cases"] == split["train"]


def test_bf16_step_matches_fp32(small_demo, tmp_path):
    """A pretraining step under bf16 autocast (what --amp does on a GPU and on a CPU with bf16
    instructions) against fp32, same weights, batch and augmentation, after 40 fp32 steps: the
    loss within 1%, the whole gradient at cosine > 0.98 (relative L2 error < 0.25). Taken after a
    few steps because at initialisation InfoNCE's gradient is chaotic: there, rounding the input
    patches alone to bf16 changes the fp32 gradient by more than these bounds."""
    setup = pretrain.setup(
        pretrain.parse_args(
            ["--data", str(small_demo), "--out", str(tmp_path), *TINY, "--steps", "41"]
        )
    )
    model, cfg = setup.model, setup.cfg
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = list(setup.loader)
    g = torch.Generator().manual_seed(0)
    for batch in batches[:-1]:
        loss, _ = pretrain.training_step(model, batch, cfg, g, torch.device("cpu"), None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    results = {}
    for dtype in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        loss, _ = pretrain.training_step(
            model, batches[-1], cfg, torch.Generator().manual_seed(0), torch.device("cpu"), dtype
        )
        loss.backward()
        results[dtype] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    (loss32, grad32), (loss16, grad16) = results[None], results[torch.bfloat16]
    assert loss16 == pytest.approx(loss32, rel=0.01)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.98
    assert (grad16 - grad32).norm() / grad32.norm() < 0.25


def test_learning_rate_schedules():
    cfg = dict(lr=1.0, warmup_steps=4, steps=14, lr_schedule="cosine")
    lrs = [pretrain.learning_rate(s, cfg) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == pytest.approx(1.0)
    assert (
        lrs[9] == pytest.approx(0.5)
        and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
        and lrs[-1] > 0
    )
    assert [pretrain.learning_rate(s, dict(cfg, lr_schedule="constant")) for s in (3, 4, 13)] == [
        1.0,
        1.0,
        1.0,
    ]
    assert pretrain.learning_rate(0, dict(cfg, warmup_steps=0)) == 1.0
