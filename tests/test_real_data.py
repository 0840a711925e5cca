"""The real data: the public CIFAR-10 ResNets and CIFAR-10 as JPEG class folders.

Read from ``../shared/data`` relative to the repository root; every test here is
skipped when that folder (or the file it needs) is absent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from sketch_core import UserError, load_checkpoint
from sketch_core.data import IMAGENET_MEAN, IMAGENET_STD, load_data
from sketch_core.train import evaluate

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
