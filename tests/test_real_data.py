"""The real data: the public CIFAR-10 ResNets and CIFAR-10 as JPEG class folders.

Read from ``../shared/data`` relative to the repository root; every test here is
skipped when that folder (or the file it needs) is absent.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch

from sketch_core.errors import UserError
from sketch_core.io.checkpoint import load_checkpoint
from sketch_core.data.sets import IMAGENET_MEAN, IMAGENET_STD, load_data
from sketch_core.training.loop import evaluate

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PRETRAINED = DATA / "pretrained"
JPEG = DATA / "cifar10-jpg"
RESNET20, RESNET56 = PRETRAINED / "resnet20-12fca82f.th", PRETRAINED / "resnet56-4bfd9763.th"


def need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"real data not found: {', '.join(missing)} (expected ../shared/data beside "
                    f"the repository; see its README)")


@pytest.mark.parametrize("path, cfg, units", [(RESNET20, "resnet20", 9), (RESNET56, "resnet56", 27)])
def test_public_cifar_resnets_load_with_their_head_mapped(path, cfg, units):
    need(path)
    loaded = load_checkpoint(path, cfg)
    meta = loaded.meta
    assert (meta["format"], meta["cfg"], meta["family"]) == ("state_dict", cfg, "cifar")
    assert meta["head_renamed"] == ["linear", "fc"] and not meta["pruned"]
    assert meta["messages"] == ["head 'linear' read as 'fc'"]
    assert len(meta["rates"]) == units and meta["num_classes"] == 10
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(loaded.model.fc.weight, raw["module.linear.weight"])
    assert torch.equal(loaded.model.layer3[-1].bn2.running_var, raw[f"module.layer3.{units // 3 - 1}.bn2.running_var"])


def test_public_resnet_of_another_depth_is_a_clear_error():
    need(RESNET20, RESNET56)
    with pytest.raises(UserError, match=r"cifar resnet56: key layer1\.3\.conv1\.weight \(shape "
                                        r"\(16, 16, 3, 3\) unpruned\) is missing from the file "
                                        r"\(the file holds a resnet20\)"):
        load_checkpoint(RESNET20, "resnet56")
    with pytest.raises(UserError, match=r"cifar resnet20: unexpected key layer1\.3\.conv1\.weight "
                                        r"\(shape \(16, 16, 3, 3\)\) in the file \(the file holds a "
                                        r"resnet56\)"):
        load_checkpoint(RESNET56, "resnet20")


@pytest.fixture(scope="module")
def jpeg_test_set(tmp_path_factory):
    """The 10,000 JPEG test images as a folder set, with a token training split.

    ``train/`` links two images of each class (load_data needs a training split; the
    real one would add 50,000 decodes), ``test/`` is the real test folder.
    """
    need(JPEG / "test", JPEG / "train")
    root = tmp_path_factory.mktemp("cifar10_jpg_test")
    for c in sorted(os.listdir(JPEG / "train")):
        (root / "train" / c).mkdir(parents=True)
        for name in sorted(os.listdir(JPEG / "train" / c))[:2]:
            (root / "train" / c / name).symlink_to(JPEG / "train" / c / name)
    (root / "test").symlink_to(JPEG / "test")
    return root, tmp_path_factory.mktemp("folder_cache")


@pytest.mark.cluster  # 10,000 JPEGs end to end
def test_public_resnet20_scores_81_percent_on_the_jpeg_test_set(jpeg_test_set, one_torch_thread):
    """Eval only, on one thread: about 25 s of CPU time for the 10,000 images."""
    need(RESNET20)
    root, cache = jpeg_test_set
    t0 = time.perf_counter()
    data = load_data("folder", root, val_fraction=0.0, eval_batch_size=500, cache_dir=cache,
                     normalize=(IMAGENET_MEAN, IMAGENET_STD))
    t_load = time.perf_counter() - t0
    assert (data.family, data.input_size, data.num_classes) == ("cifar", 32, 10)
    assert data.classes[:3] == ["airplane", "automobile", "bird"] and len(data.test.index) == 10_000
    model = load_checkpoint(RESNET20, "resnet20").model
    t0 = time.perf_counter()
    result = evaluate(model, data.test, "cpu")
    print(f"decode {t_load:.1f} s, eval {time.perf_counter() - t0:.1f} s, "
          f"top-1 {100 * result['acc']:.2f}%")
    assert result["n"] == 10_000
    assert abs(result["acc"] - 0.810) <= 0.003


def _cli(argv, capsys):
    import launch

    rc = launch.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _test_acc(out: str) -> float:
    return float(re.search(r"test acc ([\d.]+)%", out).group(1))


@pytest.mark.cluster  # 10,000 JPEGs end to end
def test_cli_test_only_of_the_public_resnets_on_the_jpeg_folder(jpeg_test_set, capsys,
                                                                monkeypatch, one_torch_thread):
    """The issue's acceptance commands on the 10,000 test images (with a token train/):
    ResNet-20 at --input_size 32, ResNet-56 with the input size and family found by itself."""
    need(RESNET20, RESNET56)
    root, cache = jpeg_test_set
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    common = ["sketch", "--test_only", "--data_set", "folder", "--data_path", root,
              "--arch", "resnet", "--normalize", "imagenet"]
    t0 = time.perf_counter()
    rc, out, err = _cli([*common, "--input_size", 32, "--cfg", "resnet20",
                         "--sketch_model", RESNET20], capsys)
    assert rc == 0, err
    assert "head 'linear' read as 'fc'" in out
    assert abs(_test_acc(out) - 81.0) <= 0.3 and "on 10000 images" in out
    t1 = time.perf_counter()
    rc, out, err = _cli([*common, "--cfg", "resnet56", "--sketch_model", RESNET56], capsys)
    assert rc == 0, err
    print(f"resnet20 {t1 - t0:.1f} s, resnet56 {time.perf_counter() - t1:.1f} s")
    # 125.49M MACs: the CIFAR ResNet-56 at 32x32, chosen by itself
    assert abs(_test_acc(out) - 83.2) <= 0.3 and "FLOPs (MACs) 125.49M" in out


def test_info_on_the_public_resnet56(capsys):
    need(RESNET56)
    rc, out, err = _cli(["info", "--cfg", "resnet56", "--sketch_model", RESNET56], capsys)
    assert rc == 0, err
    assert "head 'linear' read as 'fc'" in out
    assert "cifar resnet56: 27 sketch rates, input 3x32x32" in out
    assert re.search(r"unpruned\s+125\.49M\s+853\.02K", out)


def _subset(root: Path, per_class: dict[str, int]) -> Path:
    """Links to the first images of each class of the real splits (``{"train": n, ...}``)."""
    for split, n in per_class.items():
        for c in sorted(os.listdir(JPEG / split)):
            (root / split / c).mkdir(parents=True)
            for name in sorted(os.listdir(JPEG / split / c))[:n]:
                (root / split / c / name).symlink_to(JPEG / split / c / name)
    return root


def test_pretrain_init_adapts_the_public_resnet20_to_the_jpeg_images(tmp_path, capsys,
                                                                     monkeypatch,
                                                                     one_torch_thread):
    """One epoch on 2,000 training images raises the test accuracy (1,000 fixed test
    images); the result records its normalisation and split, and refuses a contradiction."""
    need(RESNET20, JPEG / "train", JPEG / "test")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = _subset(tmp_path / "jpeg", {"train": 200, "test": 100})
    data = ["--data_set", "folder", "--data_path", root]
    rc, out, err = _cli(["sketch", "--test_only", *data, "--cfg", "resnet20", "--sketch_model",
                         RESNET20, "--normalize", "imagenet"], capsys)
    assert rc == 0, err
    before = _test_acc(out)
    job = tmp_path / "job"
    rc, out, err = _cli(["pretrain", *data, "--init", RESNET20, "--cfg", "resnet20",
                         "--normalize", "imagenet", "--num_epochs", 1, "--lr", 0.01,
                         "--val_fraction", 0, "--job_dir", job, "--no_progress"], capsys)
    assert rc == 0, err
    best = job / "checkpoint" / "model_best.pt"
    rc, out, err = _cli(["sketch", "--test_only", *data, "--sketch_model", best], capsys)
    assert rc == 0, err
    after = _test_acc(out)
    print(f"test acc on 1,000 JPEG test images: {before:.2f}% -> {after:.2f}%")
    assert after > before + 0.5
    meta = load_checkpoint(best).meta
    assert meta["normalize"] == (IMAGENET_MEAN, IMAGENET_STD)
    assert meta["split"] == {"data_set": "folder", "data_path": str(root.resolve()), "seed": 0,
                             "val_fraction": 0.0, "weights_from": RESNET20.name,
                             "weights_split": None}  # the public weights saw every image
    rc, out, err = _cli(["sketch", "--test_only", *data, "--sketch_model", best,
                         "--normalize", "cifar"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "--normalize cifar contradicts" in err and "trained with --normalize imagenet" in err


def test_a_head_of_another_class_count_names_both(tmp_path, capsys, monkeypatch):
    need(RESNET20, JPEG / "train", JPEG / "test")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "three"
    for split in ("train", "test"):
        for c in ("airplane", "bird", "cat"):
            (root / split / c).mkdir(parents=True)
            for name in sorted(os.listdir(JPEG / split / c))[:2]:
                (root / split / c / name).symlink_to(JPEG / split / c / name)
    rc, out, err = _cli(["sketch", "--test_only", "--data_set", "folder", "--data_path", root,
                         "--cfg", "resnet20", "--sketch_model", RESNET20], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "has 10 classes; the data set has 3" in err
