"""--normalize, --force_normalize, --family and pretrain --init, and their bad input.

No real data needed: digits, synthetic data and generated image folders.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import launch
from sketch_core.errors import UserError
from sketch_core.data.normalize import (IMAGENET_MEAN, IMAGENET_STD, choose_normalize, format_normalize,
                                   parse_normalize, same_normalize)

DIGITS = ["--data_set", "digits", "--arch", "resnet", "--cfg", "resnet20", "--no_progress"]


def cli(argv, capsys):
    rc = launch.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def bad(capsys, argv, match):
    rc, out, err = cli(argv, capsys)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in out + err


def test_parse_normalize_presets_text_and_errors():
    assert parse_normalize("imagenet") == (IMAGENET_MEAN, IMAGENET_STD)
    assert parse_normalize(" CIFAR ")[0] == (0.4914, 0.4822, 0.4465)
    assert parse_normalize("0.5,0.5,0.5/0.25,0.25,0.25") == ((0.5,) * 3, (0.25,) * 3)
    assert parse_normalize("0.5/0.25", channels=3) == ((0.5,), (0.25,))
    assert parse_normalize(None) is None and parse_normalize(((0.1,), (0.2,))) == ((0.1,), (0.2,))
    assert format_normalize(parse_normalize("imagenet")) == "imagenet"
    assert format_normalize(((0.5, 0.5), (0.25, 0.25))) == "0.5,0.5/0.25,0.25"
    assert same_normalize(((0.5,), (0.2,)), ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))
    for text, match in (("bogus", "unknown preset or not MEAN/STD"),
                        ("0.5,x/0.2", "the mean is not a list of numbers"),
                        ("0.5,0.5/0.2", "the mean has 2 values and the std 1"),
                        ("0.5/0", "every std must be positive"),
                        ("1/2/3", "unknown preset or not MEAN/STD")):
        with pytest.raises(UserError, match=match):
            parse_normalize(text)
    with pytest.raises(UserError, match=r"has 2 values per list; the data has 3 channel"):
        parse_normalize("0.5,0.5/0.2,0.2", channels=3)
    rec = parse_normalize("imagenet")
    assert choose_normalize(None, rec) == rec and choose_normalize("cifar", None)[1][0] == 0.2023
    with pytest.raises(UserError, match=r"--normalize cifar contradicts f\.pt, whose network was "
                                        r"trained with --normalize imagenet.*--force_normalize"):
        choose_normalize("cifar", rec, source="f.pt")
    assert choose_normalize("cifar", rec, force=True) == parse_normalize("cifar")


@pytest.fixture(scope="module")
def normalized_job(tmp_path_factory):
    """A one-epoch digits ResNet-20 pretrained with --normalize 0.5/0.25."""
    from conftest import torch_threads

    job = tmp_path_factory.mktemp("norm_job")
    with torch_threads(1):
        rc = launch.main(["pretrain", *DIGITS, "--num_epochs", "1", "--normalize", "0.5/0.25",
                          "--job_dir", str(job)])
    assert rc == 0
    return job


def test_checkpoint_and_state_record_the_normalisation_and_later_runs_use_it(normalized_job,
                                                                              capsys):
    from sketch_core.io.checkpoint import load_checkpoint
    from sketch_core.training.loop import load_state

    best = normalized_job / "checkpoint" / "model_best.pt"
    meta = load_checkpoint(best).meta
    assert meta["normalize"] == ((0.5,), (0.25,))
    assert meta["split"] == {"data_set": "digits", "data_path": None, "seed": 0,
                             "val_fraction": 0.1}
    state = load_state(normalized_job / "checkpoint" / "train_state.pt")
    assert state["meta"]["normalize"] == {"mean": [0.5], "std": [0.25]}
    # --test_only without the flag uses the record: the same accuracy as with it
    accs = []
    for extra in ([], ["--normalize", "0.5/0.25"], ["--normalize", "0.1/0.5", "--force_normalize"]):
        rc, out, _ = cli(["sketch", "--test_only", *DIGITS, "--sketch_model", best, *extra], capsys)
        assert rc == 0
        accs.append(re.search(r"test acc ([\d.]+)%", out).group(1))
    assert accs[0] == accs[1]
    # contradictions name both, before anything is loaded; so does --resume
    bad(capsys, ["sketch", "--test_only", *DIGITS, "--sketch_model", best, "--normalize", "0.4/0.2"],
        r"--normalize 0\.4/0\.2 contradicts .*model_best\.pt, whose network was trained with "
        r"--normalize 0\.5/0\.25; drop --normalize, or add --force_normalize")
    bad(capsys, ["pretrain", *DIGITS, "--job_dir", normalized_job, "--resume", normalized_job,
                 "--num_epochs", "2", "--normalize", "0.4/0.2"],
        r"contradicts .*train_state\.pt.*--normalize 0\.5/0\.25")
    bad(capsys, ["sketch", "--test_only", *DIGITS, "--sketch_model", best, "--normalize", "cifar"],
        r"--normalize cifar has 3 values per list; data set digits has 1 channel")
    bad(capsys, ["sketch", "--test_only", *DIGITS, "--sketch_model", best, "--force_normalize"],
        r"--force_normalize .* give --normalize too")


def test_pretrain_init_starts_from_a_checkpoint_and_keeps_its_record(normalized_job, tmp_path,
                                                                     capsys, one_torch_thread):
    from sketch_core.io.checkpoint import load_checkpoint

    best = normalized_job / "checkpoint" / "model_best.pt"
    job = tmp_path / "init"
    rc, out, err = cli(["pretrain", *DIGITS, "--init", best, "--num_epochs", "0",
                        "--job_dir", job], capsys)
    assert rc == 0, err
    assert "starting from" in out
    got = load_checkpoint(job / "checkpoint" / "model_best.pt")
    want = load_checkpoint(best)
    assert got.meta["normalize"] == ((0.5,), (0.25,))  # the init's record, with no flag
    for k, v in want.model.state_dict().items():
        assert torch.equal(got.model.state_dict()[k], v), k
    # bad input: a class count other than the data's (both named), a missing file,
    # --init on sketch, --init with --resume
    bad(capsys, ["pretrain", "--data_set", "synthetic", "--num_classes", "4", "--cfg", "resnet20",
                 "--init", best, "--job_dir", tmp_path / "j2", "--no_progress"],
        r"has 10 classes; the data set has 4")
    bad(capsys, ["pretrain", *DIGITS, "--init", tmp_path / "nope.pt", "--job_dir", tmp_path / "j3"],
        r"--init .*nope\.pt: checkpoint does not exist")
    bad(capsys, ["pretrain", *DIGITS, "--init", best, "--resume", normalized_job,
                 "--job_dir", tmp_path / "j4"], r"--init starts a new training and --resume")
    assert not (tmp_path / "j3").exists() and not (tmp_path / "j4").exists()


def test_family_flag_and_its_errors(tmp_path, capsys):
    job = ["--job_dir", tmp_path / "job"]
    bad(capsys, ["pretrain", *DIGITS, *job, "--family", "cifr"],
        r"unknown --family 'cifr'; valid: cifar, imagenet")
    bad(capsys, ["pretrain", "--data_set", "digits", "--cfg", "densenet121", "--family", "cifar",
                 *job], r"the cifar family has no --cfg 'densenet121'; valid: .*densenet40")
    bad(capsys, ["info", "--cfg", "densenet121", "--family", "cifar"],
        r"the cifar family has no --cfg 'densenet121'")
    bad(capsys, ["info", "--cfg", "resnet56", "--family", "x"], r"unknown --family 'x'")
    assert not (tmp_path / "job").exists()
    # a cfg both families have: --family says which
    rc, out, _ = cli(["info", "--cfg", "resnet50", "--family", "cifar"], capsys)
    assert rc == 0 and out.startswith("cifar resnet50: 24 sketch rates, input 3x32x32")
    rc, out, _ = cli(["info", "--cfg", "resnet50", "--data_set", "folder", "--input_size", "32"],
                     capsys)
    assert rc == 0 and out.startswith("cifar resnet50")


def _small_folder(root, size=16, classes=("ants", "bees"), n=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8) + 60 * c
                Image.fromarray(img.astype(np.uint8)).save(root / split / name / f"{i:04d}.jpg")
    return root


def test_folder_of_small_images_picks_its_size_and_the_cifar_family(tmp_path, capsys,
                                                                    monkeypatch, one_torch_thread):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = _small_folder(tmp_path / "small")
    job = tmp_path / "job"
    # resnet50 is in both families: 16x16 images are CIFAR-sized, so the CIFAR ResNet-50
    rc, out, err = cli(["pretrain", "--data_set", "folder", "--data_path", root, "--cfg", "resnet50",
                        "--num_epochs", "0", "--job_dir", job, "--no_progress",
                        "--val_fraction", "0"], capsys)
    assert rc == 0, err
    from sketch_core.io.checkpoint import load_checkpoint

    meta = load_checkpoint(job / "checkpoint" / "model_best.pt").meta
    assert (meta["family"], meta["cfg"], meta["num_classes"]) == ("cifar", "resnet50", 2)
    assert list((tmp_path / "cache" / "sketchtune" / "folders").glob("*.pt"))


def test_folder_errors_and_huge_rate_vectors_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    job = ["--job_dir", tmp_path / "job", "--no_progress", "--cfg", "resnet20"]
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "val").mkdir()
    bad(capsys, ["pretrain", "--data_set", "folder", "--data_path", flat, *job],
        r"no class folders")
    empty = _small_folder(tmp_path / "empty")
    (empty / "train" / "cats").mkdir()
    bad(capsys, ["pretrain", "--data_set", "folder", "--data_path", empty, *job],
        r"train/cats holds no images")
    text = _small_folder(tmp_path / "text")
    (text / "train" / "bees" / "0009.jpg").write_text("not an image")
    bad(capsys, ["pretrain", "--data_set", "folder", "--data_path", text, *job],
        r"bees/0009\.jpg is not a readable image")
    mixed = _small_folder(tmp_path / "mixed")
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(mixed / "train" / "bees" / "0009.jpg")
    bad(capsys, ["pretrain", "--data_set", "folder", "--data_path", mixed, *job],
        r"more than one size.*16x16.*0009\.jpg is 20x20")
    bad(capsys, ["info", "--cfg", "resnet56", "--sketch_rate", "[0.5]*1000000000"],
        r"takes 27 sketch rates, got 1000000000")
    assert not (tmp_path / "job" / "checkpoint" / "train_state.pt").exists()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.pt"))


def test_search_config_takes_normalize_and_family():
    from search.experiment.config import config_from_dict

    cfg = config_from_dict({"model": {"cfg": "resnet50", "data_set": "cifar10",
                                      "normalize": "imagenet", "family": "cifar"}})
    assert cfg.model.resolved_arch().family == "cifar"
    for model, match in (({"normalize": "0.5,0.5/0.2,0.2"}, r"model\.normalize: .*2 values per "
                                                            r"list; data set cifar10 has 3"),
                         ({"normalize": "nope"}, r"model\.normalize: .*unknown preset"),
                         ({"force_normalize": True}, r"model\.force_normalize: .*model\.normalize"),
                         ({"family": "cifr"}, r"model\.family: 'cifr' is not one of cifar, "
                                              r"imagenet; did you mean 'cifar'"),
                         ({"family": "cifar", "cfg": "densenet121"},
                          r"the cifar family has no --cfg 'densenet121'")):
        with pytest.raises(UserError, match=match):
            config_from_dict({"model": {"cfg": "resnet56", **model}})
