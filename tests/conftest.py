"""Shared test fixtures. Session-scoped ones are built once per test run and reused."""

from __future__ import annotations

import contextlib
import os
import pickle

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

@pytest.fixture(autouse=True)
def _ray_only_in_the_cluster_tier(request, monkeypatch):
    """A test outside the ``cluster`` tier that starts Ray fails, saying so: the fast
    tier (the default ``pytest -q``) never pays for a Ray instance."""
    if request.node.get_closest_marker("cluster") is not None:
        yield
        return
    try:
        import ray
    except ImportError:
        yield
        return

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts Ray: mark it pytest.mark.cluster")

    monkeypatch.setattr(ray, "init", refuse)
    yield


CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def write_cifar10(root, n_train_per_batch: int = 40, n_test: int = 50, seed: int = 0) -> dict:
    """A CIFAR-10 folder in torchvision's real on-disk format (pickled dicts, N x 3072 uint8)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in CIFAR10_FILES:
        n = n_test if name == "test_batch" else n_train_per_batch
        labels = rng.integers(0, 10, n)
        # the label sets the brightness, so that a network can learn the images
        data = rng.integers(0, 60, (n, 3072), dtype=np.uint8) + (labels * 19).astype(np.uint8)[:, None]
        entry = {"batch_label": name, "labels": labels.tolist(), "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        batches[name] = entry
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return batches


def write_image_folder(root, classes=("ants", "bees", "cats"), n_train: int = 6, n_val: int = 2,
                       size: int = 40):
    """An ImageNet-style folder (train/<class>/*.jpg, val/<class>/*.jpg) of generated JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (size, size + 8, 3), dtype=np.uint8) + 60 * c
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.jpg")
    return root


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory):
    """(root, batches): a generated CIFAR-10 folder (200 training, 50 test images)."""
    root = tmp_path_factory.mktemp("cifar10")
    return root, write_cifar10(root)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A generated ImageNet-style class-folder data set: 3 classes, 18 train and 6 val JPEGs."""
    return write_image_folder(tmp_path_factory.mktemp("images"))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` intra-op threads: small CPU models train faster on one thread than on
    two that fight other processes for the cores."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture()
def one_torch_thread():
    """The test runs with one intra-op thread (see :func:`torch_threads`)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def digits_pretrain_dir(tmp_path_factory):
    """The job folder of ``launch.py pretrain`` of a CIFAR ResNet-20 on digits, defaults."""
    import launch

    job = tmp_path_factory.mktemp("digits_resnet20")
    with torch_threads(1):
        rc = launch.main(["pretrain", "--data_set", "digits", "--arch", "resnet", "--cfg",
                          "resnet20", "--job_dir", str(job), "--no_progress"])
    assert rc == 0
    return job


@pytest.fixture(scope="session")
def digits_resnet20_ckpt(digits_pretrain_dir):
    """Path of a digits-pretrained ResNet-20 sketchtune checkpoint (best on validation)."""
    return digits_pretrain_dir / "checkpoint" / "model_best.pt"


# ---------------------------------------------------------------------------- search

def run_launch(args: list[str], timeout: float = 600, env: dict | None = None):
    """``python launch.py ARGS`` in a subprocess (its own Ray instance); CompletedProcess."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(root / "launch.py"), *args], cwd=root,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def search_cache_dir(tmp_path_factory):
    """Where searches in tests cache their pretrained digits baseline (shared by all)."""
    return tmp_path_factory.mktemp("baseline_cache")


@pytest.fixture(scope="session")
def quickstart_experiment(tmp_path_factory, search_cache_dir):
    """The folder of one small real quickstart search (digits, ResNet-20, 12 trials of 2
    epochs, ASHA, knee retrained for 2 epochs), run once through ``launch.py search``."""
    root = tmp_path_factory.mktemp("experiments")
    proc = run_launch(["search", "--config", "quickstart", "--storage_path", str(root),
                       "--name", "quickstart", "--num_samples", "12", "--budget", "5m",
                       "--set", "trial.epochs=2", "--set", "scheduler.reduction_factor=2",
                       "--set", "retrain.epochs=2",
                       "--set", f"model.pretrain.cache_dir={search_cache_dir}"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (root / "quickstart_stdout.txt").write_text(proc.stdout)
    return root / "quickstart"


def sketch_at(model, cfg, rates=None, data_set: str = "cifar10", *, start_conv=None,
              round_to: int = 1, batches=None, seed: int = 0, lsq_log=None, widths=None,
              **options):
    """``sketch`` called the way a test reads best: a cfg name (or Arch) and a rate vector
    (syntax or list), the sketch options as keywords. Resolves them as a caller would:
    :func:`resolve_arch`, :func:`parse_rates`, :func:`widths_for`, :class:`SketchOptions`."""
    from sketch_core.options import SketchOptions
    from sketch_core.plans import widths_for
    from sketch_core.pruning.prune import sketch
    from sketch_core.rates import parse_rates
    from sketch_core.registry import resolve_arch

    opts = SketchOptions(**options)
    arch = resolve_arch(cfg, data_set, start_conv=start_conv)
    if widths is None:
        if rates is None:
            raise ValueError("give rates or widths")
        widths = widths_for(arch.plan(), parse_rates(rates, arch), opts.sketch_lastconv, round_to)
    return sketch(model, arch, widths, opts, batches=batches, seed=seed, lsq_log=lsq_log)


def trial_setup_for(cfg, data_set, num_classes, in_channels, *, trial=None, sketch=None,
                    input_size=None, synthetic=None, **fields):
    """A :class:`~search.run.trial.TrialSetup` resolved from config sections the way a
    search resolves it (``trial``: a TrialConfig, ``sketch``: a SketchConfig)."""
    from search.experiment.config import SketchConfig, TrialConfig
    from search.run.trial import TrialSetup
    from sketch_core.data.request import DataRequest
    from sketch_core.registry import resolve_arch

    t, s = trial or TrialConfig(), sketch or SketchConfig()
    data = DataRequest(data_set, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size,
                       val_fraction=t.val_fraction, seed=t.seed, input_size=input_size,
                       synthetic=synthetic)
    arch = resolve_arch(cfg, data_set, start_conv=s.start_conv, input_size=input_size)
    return TrialSetup(arch=arch, data=data, options=s.options(), recipe=t.recipe(),
                      num_classes=num_classes, in_channels=in_channels,
                      train_images=t.train_images, val_images=t.val_images, **fields)
