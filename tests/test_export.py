"""Export to ONNX and torch.export: every architecture kind matches PyTorch's logits,
the metadata describes the model, and bad input is one line with nothing written."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import launch
from sketch_core.io.checkpoint import save_checkpoint
from sketch_core.io.export import (example_batch, export_checkpoint, export_model, prepare_checkpoint, read_metadata,
                                 run_exported, trace)
from sketch_core.rates import rates_to_widths
from sketch_core.registry import resolve_arch

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx, onnxscript and onnxruntime are not "
                                "installed (pip install 'sketchtune[export]')")

# one model of each architecture kind; ImageNet ones at a small input
KINDS = [("cifar", "resnet20", None), ("cifar", "vgg16", None), ("cifar", "googlenet", None),
         ("cifar", "densenet40", None), ("imagenet", "resnet18", 64), ("imagenet", "resnet50", 64),
         ("imagenet", "vgg16_bn", 64), ("imagenet", "googlenet", 64),
         ("imagenet", "densenet121", 64)]
SLOW_KINDS = {"vgg16_bn", "densenet121"}  # 20 s each to trace: the cluster tier
TOLERANCE = 1e-4


def _settle_bn(model: nn.Module, shape: tuple[int, ...], seed: int) -> None:
    """BN statistics that are not the initial ones: a few train-mode passes on random data."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the passes
            m.weight.data.uniform_(0.8, 1.2, generator=gen)
            m.bias.data.uniform_(-0.1, 0.1, generator=gen)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn((8, *shape), generator=gen))
    # a little below unit gain per BN, so the random deep networks stay well conditioned in
    # float32 (an untrained ResNet-50's residual stream otherwise grows block by block)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.mul_(2).clamp_(min=0.05)
    model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, cfg) -> (checkpoint path, input size, rates, widths): a random rate vector each."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, (family, cfg, size) in enumerate(KINDS):
        entry = resolve_arch(cfg, family=family, input_size=size)
        rng = random.Random(i)
        rates = [round(rng.uniform(0.3, 1.0), 3) for _ in range(entry.num_units)]
        widths = rates_to_widths(entry, rates)
        torch.manual_seed(i)
        model = entry.build(widths, 10, 3)
        _settle_bn(model, (3, size or 32, size or 32), i)
        path = root / f"{family}_{cfg}.pt"
        save_checkpoint(path, model, cfg=entry, rates=rates, widths=widths, num_classes=10)
        out[(family, cfg)] = (path, size, rates, widths)
    return out


@pytest.mark.parametrize("family, cfg", [
    pytest.param(f, c, id=f"{f}-{c}", marks=[pytest.mark.cluster] if c in SLOW_KINDS else [])
    for f, c, _ in KINDS])
def test_export_matches_pytorch(checkpoints, tmp_path, family, cfg):
    """Both formats from one trace (what export_checkpoint does, minus tracing twice)."""
    path, size, rates, widths = checkpoints[(family, cfg)]
    model, shape, metadata = prepare_checkpoint(path, input_size=size)
    side = size or 32
    assert shape == (3, side, side)
    running = [m.running_var for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert running and not all(torch.equal(v, torch.ones_like(v)) for v in running)
    program = trace(model, shape, batch=2)
    for to in ("pt2", "onnx") if HAVE_ONNX else ("pt2",):
        out = tmp_path / f"model.{to}"
        res = export_model(model, out, to=to, input_shape=shape, batch=2, metadata=metadata,
                           program=program)
        assert res.path == out and out.is_file()
        assert 0 <= res.max_abs_diff <= TOLERANCE, f"{family} {cfg} {to}: {res.max_abs_diff}"
        meta = read_metadata(out)
        assert meta["family"] == family and meta["cfg"] == cfg and meta["batch"] == "2"
        assert json.loads(meta["input_shape"]) == [3, side, side]
        assert json.loads(meta["widths"]) == widths and json.loads(meta["rates"]) == rates
        assert meta["num_classes"] == "10" and meta["output"] == "logits"
        assert "normalised" in meta["input"]
        norm = json.loads(meta["normalize"])
        assert len(norm["mean"]) == len(norm["std"]) == 3
        assert meta["normalize_source"] == f"default of the {family} family"


@pytest.mark.parametrize("to", [pytest.param("onnx", marks=needs_onnx), "pt2"])
def test_dynamic_batch_and_the_command_line(checkpoints, tmp_path, capsys, to):
    path, _, _, _ = checkpoints[("cifar", "resnet20")]
    out = tmp_path / f"dyn.{to}"
    assert launch.main(["export", "--checkpoint", str(path), "--to", to, "--out", str(out),
                        "--dynamic_batch"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "max abs logit difference vs PyTorch: " in text
    diff = float(text.rsplit(": ", 1)[1])
    assert diff <= TOLERANCE
    assert read_metadata(out)["batch"] == "dynamic"
    x = example_batch((3, 32, 32), 5, seed=3)
    assert run_exported(out, to, x).shape == (5, 10)
    # replacing needs --force; with it the file is rewritten
    assert launch.main(["export", "--checkpoint", str(path), "--to", to, "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert launch.main(["export", "--checkpoint", str(path), "--to", to, "--out", str(out),
                        "--force"]) == 0


def test_default_output_is_beside_the_checkpoint(checkpoints, tmp_path, capsys):
    src, _, _, _ = checkpoints[("cifar", "resnet20")]
    ckpt = tmp_path / "model_best.pt"
    ckpt.write_bytes(src.read_bytes())
    assert launch.main(["export", "--checkpoint", str(ckpt), "--to", "pt2"]) == 0
    assert (tmp_path / "model_best.pt2").is_file()


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert launch.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_bad_input_is_one_line_and_writes_nothing(checkpoints, tmp_path, capsys):
    path, _, _, _ = checkpoints[("cifar", "resnet20")]
    before = set(tmp_path.iterdir())
    _one_line_error(capsys, ["export", "--checkpoint", str(path), "--to", "onx",
                             "--out", str(tmp_path / "a.onnx")],
                    "unknown --to 'onx'", "did you mean onnx", "onnx, pt2")
    _one_line_error(capsys, ["export", "--checkpoint", str(path), "--to", "pt2",
                             "--out", str(tmp_path / "nofolder" / "a.pt2")],
                    "does not exist")
    # an original-format file (a bare state_dict), and a file that is no checkpoint at all
    bare = tmp_path / "bare.pt"
    torch.save({"state_dict": resolve_arch("resnet20").build().state_dict()}, bare)
    _one_line_error(capsys, ["export", "--checkpoint", str(bare), "--to", "pt2",
                             "--out", str(tmp_path / "b.pt2")],
                    "is not a sketchtune checkpoint", "state_dict", "launch.py sketch",
                    "pretrain --init")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _one_line_error(capsys, ["export", "--checkpoint", str(text), "--to", "pt2",
                             "--out", str(tmp_path / "c.pt2")],
                    "not a checkpoint", "launch.py sketch")
    _one_line_error(capsys, ["export", "--checkpoint", str(path), "--to", "pt2", "--batch", "0",
                             "--out", str(tmp_path / "d.pt2")], "--batch")
    assert set(tmp_path.iterdir()) == before | {bare, text}


def test_retrain_refuses_an_unknown_export_before_training(tmp_path, capsys):
    _one_line_error(capsys, ["retrain", "--experiment", str(tmp_path), "--export", "tflite"],
                    "unknown --to 'tflite'", "onnx, pt2")
    assert not (tmp_path / "retrain").exists()


@pytest.mark.cluster
@needs_onnx
def test_retrain_exports_in_the_same_step(quickstart_experiment, tmp_path, capsys):
    import shutil

    exp = tmp_path / "exp"
    shutil.copytree(quickstart_experiment, exp, ignore=shutil.ignore_patterns("checkpoint_*", "trial_*"))
    assert launch.main(["retrain", "--experiment", str(exp), "--pick", "best", "--epochs", "0",
                        "--export", "onnx"]) == 0
    assert "[retrain] exported " in capsys.readouterr().out
    job = exp / "retrain" / "best"
    result = json.loads((job / "result.json").read_text())
    assert result["export"]["path"] == str(job / "model.onnx")
    assert result["export"]["max_abs_diff"] <= TOLERANCE
    meta = read_metadata(job / "model.onnx")
    manifest = json.loads((exp / "manifest.json").read_text())
    side = manifest["baseline"]["input_size"]
    assert json.loads(meta["input_shape"]) == [1, side, side]  # digits: one channel, 8x8
    assert json.loads(meta["rates"]) == result["rates"]


REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.cluster
@needs_onnx
def test_a_real_network_scores_the_same_in_onnxruntime(tmp_path, one_torch_thread):
    """The public CIFAR ResNet-20, sketched once (select, [0.8]*9), exported to ONNX: on
    the 10,000 JPEG test images onnxruntime's top-1 is PyTorch's within 0.1 point."""
    import os

    import onnxruntime as ort

    from sketch_core.io.checkpoint import load_checkpoint
    from sketch_core.data.sets import IMAGENET_MEAN, IMAGENET_STD, load_data
    from conftest import sketch_at

    weights, jpeg = REAL / "pretrained" / "resnet20-12fca82f.th", REAL / "cifar10-jpg"
    missing = [str(p) for p in (weights, jpeg / "train", jpeg / "test") if not p.exists()]
    if missing:
        pytest.skip(f"real data not found: {', '.join(missing)} (expected ../shared/data beside "
                    f"the repository)")
    root = tmp_path / "jpg"
    for c in sorted(os.listdir(jpeg / "train")):  # a token training split; the real test split
        (root / "train" / c).mkdir(parents=True)
        for name in sorted(os.listdir(jpeg / "train" / c))[:2]:
            (root / "train" / c / name).symlink_to(jpeg / "train" / c / name)
    (root / "test").symlink_to(jpeg / "test")
    data = load_data("folder", root, val_fraction=0.0, eval_batch_size=500,
                     cache_dir=tmp_path / "cache", normalize=(IMAGENET_MEAN, IMAGENET_STD))
    model = sketch_at(load_checkpoint(weights, "resnet20").model, "resnet20", "[0.8]*9", mode="select")
    ckpt = tmp_path / "r20.pt"
    save_checkpoint(ckpt, model, cfg="resnet20", rates=[0.8] * 9)
    res = export_checkpoint(ckpt, to="onnx", dynamic_batch=True)
    assert res.max_abs_diff <= TOLERANCE
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(res.path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    model.eval()
    right_torch = right_ort = n = 0
    with torch.no_grad():
        for x, y in data.test:
            right_torch += int((model(x).argmax(1) == y).sum())
            right_ort += int((torch.from_numpy(sess.run(None, {name: x.numpy()})[0]).argmax(1) == y).sum())
            n += len(y)
    assert n == 10_000
    assert right_torch > 5_000  # the sketched network still works
    assert abs(right_torch - right_ort) <= 10, (right_torch, right_ort)
