"""``trial.train_images`` / ``trial.val_images``: a trial recipe sized by images.

Each trial epoch trains on ``train_images`` images drawn anew from the training split
(seeded by the trial seed, the rates and the epoch); every trial scores on the same
seeded ``val_images`` subset of the validation split; too many is one line naming both
numbers, before anything trains. Digits (bundled with scikit-learn) keeps it quick.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search.experiment.config import TrialConfig, config_from_dict, load_config
from conftest import trial_setup_for
from search.experiment.config import SketchConfig
from search.run.trial import train_trial
from sketch_core.data.sets import load_data
from sketch_core.data.subsets import EpochSample, check_images
from sketch_core.data.subsets import sized_data as _sized
from sketch_core.errors import UserError

RATES = [0.5] * 9


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", batch_size=64, eval_batch_size=128, val_fraction=0.1, seed=0)


def _rows(loader) -> list[torch.Tensor]:
    """The labels and first pixels of every image one epoch serves (to tell images apart)."""
    out = []
    for x, y in loader:
        out.extend(torch.cat([y.view(-1, 1).float(), x.flatten(1)[:, :16]], 1))
    return out


def sized_data(data, t: TrialConfig, rates):
    return _sized(data, t.train_images, t.val_images, t.seed, rates)


def check_trial_images(t: TrialConfig, data) -> None:
    check_images(t.train_images, t.val_images, data)


def _keys(loader) -> set[tuple]:
    return {tuple(r.tolist()) for r in _rows(loader)}


def test_config_keys():
    t = config_from_dict({"trial": {"train_images": 256, "val_images": 64}}).trial
    assert (t.train_images, t.val_images) == (256, 64)
    assert TrialConfig().train_images is None and TrialConfig().val_images is None
    with pytest.raises(UserError, match="trial.val_images: expected a positive value"):
        config_from_dict({"trial": {"val_images": 0}})


def test_none_is_all(digits):
    assert sized_data(digits, TrialConfig(), RATES) is digits


def test_train_images_per_epoch(digits):
    t = TrialConfig(train_images=200)
    data = sized_data(digits, t, RATES)
    assert isinstance(data.train, EpochSample) and data.val is digits.val
    train_rows = set(digits.train.index.tolist())
    epochs = [data.train.rows_of(e) for e in range(3)]
    for rows in epochs:
        assert len(rows) == len(set(rows.tolist())) == 200
        assert set(rows.tolist()) <= train_rows  # drawn from the training split only
    assert not torch.equal(epochs[0], epochs[1])  # drawn anew each epoch
    first = _rows(data.train)  # iterating serves epoch 0, then epoch 1
    assert len(first) == 200 and len(data.train) == 4  # batches of 64: 3 full, one of 8
    assert len(_rows(data.train)) == 200
    again = sized_data(digits, t, RATES).train  # seeded: the same trial draws the same
    assert torch.equal(again.rows_of(2), epochs[2])
    other = sized_data(digits, t, [0.6] * 9).train  # another trial draws others
    assert not torch.equal(other.rows_of(0), epochs[0])
    assert not torch.equal(sized_data(digits, TrialConfig(train_images=200, seed=1),
                                      RATES).train.rows_of(0), epochs[0])
    data.train.set_epoch(1, 1)  # a resumed epoch continues the same draw
    assert len(_rows(data.train)) == 200 - 64


def test_val_images_fixed_for_every_trial(digits):
    a = sized_data(digits, TrialConfig(val_images=50), RATES)
    b = sized_data(digits, TrialConfig(val_images=50, train_images=100), [0.3] * 9)
    assert a.train is digits.train
    assert len(_rows(a.val)) == 50 and _keys(a.val) == _keys(b.val)
    assert _keys(a.val) <= _keys(digits.val)
    assert torch.equal(a.val.index, b.val.index)
    assert len(digits.val.index) == 144  # the cached data is untouched


def test_too_many_images_name_both_numbers(digits):
    with pytest.raises(UserError) as err:
        check_trial_images(TrialConfig(train_images=5000), digits)
    assert str(err.value) == ("trial.train_images: 5000 is larger than the training split "
                              "(1293 images)")
    with pytest.raises(UserError) as err:
        check_trial_images(TrialConfig(val_images=145), digits)
    assert str(err.value) == ("trial.val_images: 145 is larger than the validation split "
                              "(144 images)")
    check_trial_images(TrialConfig(train_images=1293, val_images=144), digits)


def test_trial_code_honours_both(digits, one_torch_thread, monkeypatch):
    from sketch_core.registry import resolve_arch

    model = resolve_arch("resnet20", "digits").build(None, 10, 1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t = TrialConfig(epochs=2, train_images=96, val_images=40, batch_size=32)
    setup = trial_setup_for("resnet20", "digits", 10, 1, trial=t,
                            sketch=SketchConfig(calibration_batches=1),
                            baseline_key="random-init")
    seen: list[int] = []
    from sketch_core import pipeline

    real_fit = pipeline.fit

    def counting_fit(model, data, *args, **kw):
        seen.append(len(_rows(data.train)))
        seen.append(sum(len(y) for _, y in data.val))
        return real_fit(model, data, *args, **kw)

    reports: list[dict] = []
    monkeypatch.setattr(pipeline, "fit", counting_fit)
    train_trial(RATES, setup, state, lambda m, f: reports.append(m))
    assert [r["epoch"] for r in reports] == [1, 2] and not reports[-1]["failed"], reports
    assert seen == [96, 40]


def test_driver_checks_before_anything_trains(tmp_path):
    """Too many images: one line before the baseline is trained; nothing half-written."""
    from search.run.local_loop import run_local

    config = load_config("quickstart", [f"model.pretrain.cache_dir={tmp_path / 'cache'}",
                                        "trial.train_images=99999"])
    folder = tmp_path / "exp"
    with pytest.raises(UserError, match=r"trial.train_images: 99999 is larger than the "
                                        r"training split \(1293 images\)"):
        run_local(config, folder, quiet=True)
    assert not folder.exists() and not Path(tmp_path / "cache").exists()


@pytest.mark.cluster
def test_cli_error_names_both_numbers(capsys, tmp_path):
    """``launch.py search``: one line, exit 2, no experiment folder left behind."""
    import launch

    rc = launch.main(["search", "--config", "quickstart", "--storage_path", str(tmp_path),
                      "--name", "big", "--set", f"model.pretrain.cache_dir={tmp_path / 'c'}",
                      "--set", "trial.val_images=1000"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err == ("error: trial.val_images: 1000 is larger than the validation split "
                   "(144 images)")
    assert not (tmp_path / "big").exists()
