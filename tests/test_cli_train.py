"""``launch.py sketch`` / ``pretrain`` end to end: acceptance on digits, resume, data sets, bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import launch
from sketch_core.cost.flops import count_flops
from sketch_core.io.checkpoint import load_checkpoint
from sketch_core.rates import rates_to_widths
from sketch_core.registry import build_model

# every run here on one intra-op thread (subprocesses too: OMP_NUM_THREADS=1), which also
# keeps the bit-for-bit comparisons on one thread count
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--data_set", "digits", "--arch", "resnet", "--cfg", "resnet20", "--no_progress"]


def cli(argv, capsys):
    rc = launch.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def state_dict(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_original_options_and_defaults():
    p = launch.build_parser("sketch")
    a = p.parse_args(["sketch", "--data_set", "cifar10", "--data_path", "d", "--sketch_model", "m.pt",
                      "--job_dir", "j", "--arch", "resnet", "--cfg", "resnet56", "--lr", "0.01",
                      "--lr_decay_step", "75", "112", "--num_epochs", "150", "--gpus", "0",
                      "--sketch_rate", "[0.5]*9+[0.6]*9+[0.4]*9", "--start_conv", "1",
                      "--weight_norm_method", "l2", "--filter_norm", "True", "--sketch_bn", "False",
                      "--sketch_lastconv", "False", "--random_rule", "l1_pretrain",
                      "--train_batch_size", "64", "--eval_batch_size", "50", "--momentum", "0.8",
                      "--weight_decay", "1e-4", "--reset", "--test_only", "--refine", "r.pt",
                      "--resume", "s.pt"])
    assert (a.filter_norm, a.sketch_bn, a.sketch_lastconv) == (True, False, False)
    assert a.lr_decay_step == [75, 112] and a.gpus == [0] and a.weight_norm_method == "l2"
    d = p.parse_args(["sketch"])
    sc_cli = __import__("sketch_core.cli.train_args", fromlist=["check_args"])
    sc_cli.check_args(d)
    assert (d.num_epochs, d.lr, d.lr_decay_step) == (150, 0.01, [50, 100])
    assert (d.train_batch_size, d.eval_batch_size, d.momentum, d.weight_decay) == (128, 100, 0.9, 5e-4)
    assert (d.data_set, d.job_dir, d.start_conv, d.random_rule, d.sketch_mode) == (
        "cifar10", "./experiments", 1, "default", "sketch")
    assert (d.filter_norm, d.sketch_bn, d.sketch_lastconv, d.test_only, d.reset) == (
        False, False, True, False, False)
    # a bare boolean flag means True; anything but a boolean spelling is refused
    assert p.parse_args(["sketch", "--filter_norm"]).filter_norm is True
    with pytest.raises(SystemExit):
        p.parse_args(["sketch", "--filter_norm", "maybe"])


def test_digits_pretrain_reaches_97_percent(digits_pretrain_dir):
    result = json.loads((digits_pretrain_dir / "result.json").read_text())
    assert result["test_acc"] >= 0.97
    rows = (digits_pretrain_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 40
    log = (digits_pretrain_dir / "logger.log").read_text()
    assert "test acc of the best model" in log
    loaded = load_checkpoint(digits_pretrain_dir / "checkpoint" / "model_best.pt")
    assert (loaded.meta["cfg"], loaded.meta["num_classes"], loaded.meta["in_channels"]) == (
        "resnet20", 10, 1)


def test_digits_sketch_stays_within_two_points_and_test_only_agrees(digits_pretrain_dir,
                                                                     digits_resnet20_ckpt,
                                                                     tmp_path, capsys):
    base = json.loads((digits_pretrain_dir / "result.json").read_text())
    job = tmp_path / "sketch"
    rc, out, err = cli(["sketch", *DIGITS, "--job_dir", job, "--sketch_model", digits_resnet20_ckpt,
                        "--sketch_rate", "[0.5]*9", "--num_epochs", 15], capsys)
    assert rc == 0, err
    result = json.loads((job / "result.json").read_text())
    assert result["test_acc"] >= base["test_acc"] - 0.02
    # the MACs reduction is printed and is what the narrow model really costs
    full = build_model("resnet20", "digits", in_channels=1)
    narrow = load_checkpoint(job / "checkpoint" / "model_best.pt").model
    macs_full, _ = count_flops(full, (1, 8, 8))
    macs, _ = count_flops(narrow, (1, 8, 8))
    printed = re.findall(r"FLOPs \(MACs\) [^,]*\(reduced ([\d.]+)%\)", out)
    assert printed and float(printed[-1]) == pytest.approx(100 * (1 - macs / macs_full), abs=0.01)
    assert 45 < float(printed[-1]) < 55
    final = re.search(r"test acc of the best model ([\d.]+)%", out).group(1)
    assert out.count("running on the CPU") == (0 if torch.cuda.is_available() else 1)
    meta = torch.load(job / "checkpoint" / "model_best.pt", weights_only=True)
    assert meta["rates"] == [0.5] * 9
    widths = rates_to_widths("resnet20", [0.5] * 9, "digits")
    assert meta["widths"] == widths == [8] * 3 + [16] * 3 + [32] * 3
    # --test_only --refine on the best checkpoint prints the same test accuracy, writes nothing
    rc, out, err = cli(["sketch", *DIGITS, "--test_only", "--refine",
                        job / "checkpoint" / "model_best.pt", "--job_dir", tmp_path / "none"], capsys)
    assert rc == 0, err
    assert re.search(r"test acc ([\d.]+)%", out).group(1) == final
    assert not (tmp_path / "none").exists()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.05)


def test_sigterm_then_resume_ends_with_the_weights_of_a_straight_run(tmp_path, capsys):
    args = ["pretrain", *DIGITS, "--num_epochs", 3, "--lr_decay_step", 1, 2,
            "--train_batch_size", 64]
    rc, _, err = cli([*args, "--job_dir", tmp_path / "straight"], capsys)
    assert rc == 0, err

    job = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "launch.py", *map(str, args), "--job_dir", str(job)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = job / "checkpoint" / "train_state.pt"
    try:
        _wait_for(state, proc)  # the first epoch is done
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "--resume" in output
    saved = torch.load(state, weights_only=True)
    assert (saved["epoch"], saved["batch"]) < (3, 0)

    rc, out, err = cli([*args, "--job_dir", job, "--resume", state], capsys)
    assert rc == 0, err
    for name in ("model_last.pt", "model_best.pt"):
        a = state_dict(tmp_path / "straight" / "checkpoint" / name)
        b = state_dict(job / "checkpoint" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    straight = json.loads((tmp_path / "straight" / "result.json").read_text())
    resumed = json.loads((job / "result.json").read_text())
    assert straight["test_acc"] == resumed["test_acc"]
    assert len((job / "metrics.csv").read_text().splitlines()) == 1 + 3


def test_cifar10_folder_trains_end_to_end(cifar10_folder, tmp_path, capsys):
    root, _ = cifar10_folder
    common = ["--data_set", "cifar10", "--data_path", root, "--arch", "resnet", "--cfg", "resnet20",
              "--train_batch_size", 32, "--no_progress", "--val_fraction", 0.2]
    rc, out, err = cli(["pretrain", *common, "--num_epochs", 2, "--job_dir", tmp_path / "pre"], capsys)
    assert rc == 0, err
    ckpt = tmp_path / "pre" / "checkpoint" / "model_best.pt"
    rc, out, err = cli(["sketch", *common, "--num_epochs", 1, "--job_dir", tmp_path / "sk",
                        "--sketch_model", ckpt, "--sketch_rate", "[0.5]*9",
                        "--sketch_mode", "select", "--select_by", "channels"], capsys)
    assert rc == 0, err
    extra = load_checkpoint(tmp_path / "sk" / "checkpoint" / "model_best.pt").meta["extra"]
    assert (extra["sketch_mode"], extra["select_by"]) == ("select", "channels")
    result = json.loads((tmp_path / "sk" / "result.json").read_text())
    assert result["flops_reduction"] > 0.4 and 0 <= result["test_acc"] <= 1


def test_image_folder_trains_end_to_end(image_folder, tmp_path, capsys):
    common = ["--data_set", "folder", "--data_path", image_folder, "--arch", "resnet",
              "--cfg", "resnet18", "--input_size", 32, "--train_batch_size", 4,
              "--eval_batch_size", 4, "--num_workers", 1, "--no_progress"]
    rc, out, err = cli(["pretrain", *common, "--num_epochs", 1, "--job_dir", tmp_path / "pre"], capsys)
    assert rc == 0, err
    ckpt = tmp_path / "pre" / "checkpoint" / "model_best.pt"
    assert load_checkpoint(ckpt).meta["num_classes"] == 3
    rc, out, err = cli(["sketch", *common, "--num_epochs", 1, "--job_dir", tmp_path / "sk",
                        "--sketch_model", ckpt, "--sketch_rate", "[0.5]*8"], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "sk" / "result.json").read_text())
    assert result["flops_reduction"] > 0.2 and "test_top5" in result


def _bad(capsys, argv, match):
    rc, out, err = cli(argv, capsys)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in out + err



def test_bad_input_found_after_the_job_folder_is_made_leaves_no_folder(tmp_path, capsys,
                                                                      digits_resnet20_ckpt):
    """The data and the class count are checked once the folder exists: it goes again."""
    job = tmp_path / "job"
    _bad(capsys, ["pretrain", *DIGITS, "--num_classes", "7", "--job_dir", job],
         r"--num_classes 7 but digits has 10 classes")
    _bad(capsys, ["sketch", "--data_set", "folder", "--data_path", tmp_path / "nope", "--arch",
                  "resnet", "--cfg", "resnet20", "--job_dir", job, "--sketch_model",
                  digits_resnet20_ckpt, "--sketch_rate", "[0.5]*9"], r"not laid out")
    assert not job.exists()
    job.mkdir()  # a folder the user made is theirs: it stays
    (job / "notes.txt").write_text("mine")
    _bad(capsys, ["pretrain", *DIGITS, "--num_classes", "7", "--job_dir", job], r"classes")
    assert (job / "notes.txt").read_text() == "mine"

def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, digits_resnet20_ckpt):
    job = ["--job_dir", tmp_path / "job"]
    sk = ["sketch", *DIGITS, *job]
    _bad(capsys, ["pretrain", "--data_set", "cifar10", "--data_path", tmp_path / "missing",
                  "--arch", "resnet", "--cfg", "resnet20", *job], r"cifar-10-batches-py")
    _bad(capsys, ["pretrain", "--data_set", "folder", "--data_path", tmp_path, *job],
         r"train/<class>")
    _bad(capsys, [*sk, "--sketch_rate", "[0.5]*9"], r"--sketch_model")
    _bad(capsys, [*sk, "--sketch_model", tmp_path / "nope.pt", "--sketch_rate", "[0.5]*9"],
         r"does not exist")
    _bad(capsys, [*sk, "--sketch_model", digits_resnet20_ckpt, "--sketch_rate", "[0.5]*8"],
         r"9 sketch rates, got 8")
    _bad(capsys, [*sk, "--sketch_model", digits_resnet20_ckpt, "--sketch_rate", "[0.5]*9",
                  "--sketch_mode", "bogus"], r"sketch_mode.*valid: sketch, select, select_lsq")
    missing_gpu = torch.cuda.device_count() + 3
    _bad(capsys, ["pretrain", *DIGITS, *job, "--gpus", missing_gpu], r"--gpus")
    _bad(capsys, ["pretrain", *DIGITS, *job, "--gpus", 0, missing_gpu], r"--gpus")  # Ray Train path
    _bad(capsys, ["pretrain", *DIGITS, *job, "--num_epochs", -1], r"--num_epochs must be >= 0")
    _bad(capsys, ["pretrain", *DIGITS, *job, "--train_batch_size", 0], r"--train_batch_size must be > 0")
    _bad(capsys, ["pretrain", *DIGITS, *job, "--lr_decay_step", 30, 20], r"increasing order")
    assert not (tmp_path / "job" / "checkpoint" / "train_state.pt").exists()


def test_bad_choices_end_before_anything_is_written(tmp_path, capsys, digits_resnet20_ckpt):
    job = tmp_path / "job"
    sk = ["sketch", *DIGITS, "--job_dir", job, "--sketch_model", digits_resnet20_ckpt,
          "--sketch_rate", "[0.5]*9"]
    _bad(capsys, [*sk, "--sketch_mode", "select", "--select_by", "bias"],
         r"unknown --select_by 'bias'; valid: filters, channels")
    _bad(capsys, [*sk, "--random_rule", "l2_pretrain"], r"unknown --random_rule 'l2_pretrain'")
    _bad(capsys, [*sk, "--compile", "fast"],
         r"unknown --compile mode 'fast'; valid: default, reduce-overhead")
    _bad(capsys, ["pretrain", *DIGITS, "--job_dir", job, "--compile", "fast"], r"--compile mode")
    assert not job.exists()


def test_nan_loss_is_reported_with_its_epoch(tmp_path, capsys):
    _bad(capsys, ["pretrain", *DIGITS, "--job_dir", tmp_path, "--num_epochs", 3, "--lr", 1e12],
         r"NaN or infinite in epoch 1")


def test_job_folder_is_not_overwritten_and_reset_starts_over(tmp_path, capsys):
    args = ["pretrain", "--data_set", "synthetic", "--input_size", 8, "--arch", "resnet",
            "--cfg", "resnet20", "--num_epochs", 1, "--num_classes", 3, "--no_progress", "--job_dir", tmp_path]
    rc, _, err = cli(args, capsys)
    assert rc == 0, err
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    _bad(capsys, args, r"already holds a run.*--reset")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    (tmp_path / "notes.txt").write_text("mine")
    rc, _, err = cli([*args, "--reset"], capsys)
    assert rc == 0, err
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only this tool's files are removed
    # resuming with another configuration is refused; what was saved stays as it was
    saved = {p: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    state = tmp_path / "checkpoint" / "train_state.pt"
    _bad(capsys, [*args, "--resume", state, "--lr", 0.5], r"another configuration.*lr")
    _bad(capsys, [*args, "--resume", state, "--cfg", "resnet32"], r"another configuration.*cfg")
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == saved
    # a finished run resumed with more epochs continues it
    rc, out, err = cli([*args, "--num_epochs", 2, "--resume", tmp_path], capsys)
    assert rc == 0, err
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.cluster
def test_data_parallel_run_through_ray_train_on_cpu_workers(tmp_path):
    """The several-GPU path (Ray Train TorchTrainer + DDP), with two CPU workers over gloo."""
    pytest.importorskip("ray")  # installed with sketchtune; absent on a bare GPU test machine
    from search.run.data_parallel import run_distributed
    from sketch_core.cli.train_args import spec_from_args

    job = tmp_path / "ddp"
    args = launch.build_parser("pretrain").parse_args(
        ["pretrain", *DIGITS, "--num_epochs", "1", "--job_dir", str(job)])
    result = run_distributed(spec_from_args(args), use_gpu=False, num_workers=2)
    assert result["world_size"] == 2
    assert json.loads((job / "result.json").read_text()) == result
    rows = list(csv.DictReader(open(job / "metrics.csv")))
    assert len(rows) == 1
    # each rank trained on its half of the 1293 training images (rank 0 writes the files)
    assert int(rows[0]["train_images"]) == 647
    assert "epoch 1/1" in (job / "logger.log").read_text()
    model = load_checkpoint(job / "checkpoint" / "model_best.pt").model
    assert sum(p.numel() for p in model.parameters()) == result["params"]


def test_data_parallel_bad_input_is_reported_before_workers_start(tmp_path, digits_resnet20_ckpt):
    ray = pytest.importorskip("ray")

    from search.run.data_parallel import run_distributed
    from sketch_core.cli.train_args import spec_from_args
    from sketch_core.errors import UserError

    args = launch.build_parser("sketch").parse_args(
        ["sketch", *DIGITS, "--job_dir", str(tmp_path), "--sketch_model", str(digits_resnet20_ckpt),
         "--sketch_rate", "[0.5]*8"])
    with pytest.raises(UserError, match="9 sketch rates, got 8"):
        run_distributed(spec_from_args(args), use_gpu=False, num_workers=2)
    args.sketch_rate, args.sketch_model = "[0.5]*9", str(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="missing.pt does not exist"):
        run_distributed(spec_from_args(args), use_gpu=False, num_workers=2)
    assert not ray.is_initialized() and not (tmp_path / "checkpoint").exists()


def test_refine_fine_tunes_a_sketched_checkpoint_at_its_own_widths(digits_resnet20_ckpt, tmp_path,
                                                                   capsys):
    # zero epochs: sketch, recalibrate BN and save, no training
    rc, out, err = cli(["sketch", *DIGITS, "--job_dir", tmp_path / "s0", "--num_epochs", 0,
                        "--sketch_model", digits_resnet20_ckpt, "--sketch_rate", "[0.25]*9",
                        "--sketch_mode", "select"], capsys)
    assert rc == 0, err
    sketched = tmp_path / "s0" / "checkpoint" / "model_best.pt"
    widths = load_checkpoint(sketched).meta["widths"]
    assert widths == rates_to_widths("resnet20", [0.25] * 9, "digits")
    rc, out, err = cli(["sketch", *DIGITS, "--job_dir", tmp_path / "r", "--num_epochs", 1,
                        "--refine", sketched], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["widths"] == widths and result["rates"] == [0.25] * 9
    refined = load_checkpoint(tmp_path / "r" / "checkpoint" / "model_last.pt")
    assert refined.meta["widths"] == widths
    before = state_dict(sketched)
    after = state_dict(tmp_path / "r" / "checkpoint" / "model_last.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    # --test_only --resume evaluates the state a run left
    rc, out, err = cli(["sketch", *DIGITS, "--test_only", "--resume", tmp_path / "r"], capsys)
    assert rc == 0, err
    assert re.search(r"test acc [\d.]+%", out)
