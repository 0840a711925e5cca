"""``trial.val_source``: nothing is chosen on the images a result is reported on.

The images every choice is made on (the trials' scores, the retrain's best epoch) and
those the final test accuracy is measured on are traced through the real trial and
retrain code (``evaluate`` and ``fit`` wrapped, the batches they receive read back), on
small synthetic images whose pixels tell every image apart.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from search.experiment.config import config_from_dict, load_config
from search.experiment.scoring_split import DEFAULT_TEST_HOLDOUT, choose_val_source, split_record
from sketch_core.io.checkpoint import save_checkpoint
from sketch_core.data.sets import load_data
from sketch_core.errors import UserError
from sketch_core.registry import resolve_arch

RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) ")
SYNTH = {"n_train": 160, "n_test": 120, "num_classes": 4, "channels": 1, "size": 8, "seed": 3}


def _checkpoint(path, split: dict | None):
    """A ResNet-20 for SYNTH (untrained: only its record matters here)."""
    entry = resolve_arch("resnet20", "synthetic", input_size=8)
    model = entry.build(None, SYNTH["num_classes"], SYNTH["channels"])
    save_checkpoint(str(path), model, cfg=entry, data_set="synthetic",
                    num_classes=SYNTH["num_classes"], in_channels=SYNTH["channels"], split=split)
    return path


def _config(tmp_path, *sets: str):
    return load_config("quickstart", [f"storage.storage_path={tmp_path}",
                                      f"model.pretrain.cache_dir={tmp_path / 'cache'}",
                                      "model.data_set=synthetic", f"model.synthetic={SYNTH}",
                                      *sets])


def test_config_keys():
    t = config_from_dict({}).trial
    assert (t.val_source, t.test_holdout) == ("auto", None)
    t = config_from_dict({"trial": {"val_source": "test_holdout", "test_holdout": 500}}).trial
    assert (t.val_source, t.test_holdout) == ("test_holdout", 500)
    with pytest.raises(UserError, match=r"^config key trial.val_source: 'test' is not one of "
                                        r"auto, train_holdout, test_holdout"):
        config_from_dict({"trial": {"val_source": "test"}})
    with pytest.raises(UserError, match=r"^config key trial.test_holdout: expected a positive"):
        config_from_dict({"trial": {"test_holdout": 0}})
    with pytest.raises(UserError, match=r"^config key trial.test_holdout: sizes the test images "
                                        r"that choose, but val_source is train_holdout"):
        config_from_dict({"trial": {"val_source": "train_holdout", "test_holdout": 100}})


def test_auto_follows_the_baselines_provenance(tmp_path):
    # (a) pretrained here: on the fly, or a checkpoint that records this search's split
    assert choose_val_source(_config(tmp_path))[0] == "train_holdout"
    mine = _checkpoint(tmp_path / "mine.pt", split_record(_config(tmp_path)))
    source, why = choose_val_source(_config(tmp_path, f"model.pretrained={mine}"))
    assert source == "train_holdout" and "this search's training split" in why
    # (b) another split (another seed): it may have trained on this search's validation images
    other = _checkpoint(tmp_path / "other.pt", {**split_record(_config(tmp_path)), "seed": 7})
    source, why = choose_val_source(_config(tmp_path, f"model.pretrained={other}"))
    assert source == "test_holdout" and "another training split" in why and "seed 7" in why
    assert choose_val_source(_config(tmp_path, f"model.pretrained={mine}",
                                     "trial.seed=1"))[0] == "test_holdout"
    # (c) no record (public weights, files of other formats)
    bare = _checkpoint(tmp_path / "bare.pt", None)
    source, why = choose_val_source(_config(tmp_path, f"model.pretrained={bare}"))
    assert source == "test_holdout" and "records no training split" in why
    # an explicit choice wins
    source, why = choose_val_source(_config(tmp_path, f"model.pretrained={bare}",
                                            "trial.val_source=train_holdout"))
    assert source == "train_holdout" and why.startswith(
        "trial.val_source says so (auto would choose test_holdout: model.pretrained records no")
    assert choose_val_source(_config(tmp_path, f"model.pretrained={mine}",
                                     "trial.val_source=train_holdout")) == (
        "train_holdout", "trial.val_source says so")
    assert choose_val_source(_config(tmp_path, "trial.val_source=test_holdout"))[0] == "test_holdout"


def test_a_pretrain_run_records_the_split_auto_accepts(tmp_path):
    """``launch.py pretrain`` (sketch_core.jobs) records the split as the search reads it."""
    from sketch_core.jobs import _split_record
    from sketch_core.job_spec import DataSpec, RunSpec

    spec = RunSpec(command="pretrain", data=DataSpec(data_set="synthetic", seed=0,
                                                     val_fraction=0.1))
    assert _split_record(spec, {}) == split_record(_config(tmp_path))


def test_default_holdout_size():
    from search.experiment.scoring_split import holdout_size

    t = config_from_dict({"trial": {"val_source": "test_holdout"}}).trial
    assert holdout_size(t, 10000, "cifar10") == DEFAULT_TEST_HOLDOUT == 2000
    assert holdout_size(t, 360, "digits") == 180  # capped at half the test split


def test_holdout_is_seeded_and_checked_against_the_record():
    from search.experiment.scoring_split import scored_data

    data = load_data("synthetic", synthetic=SYNTH, val_fraction=0.0)
    t0, t1 = (config_from_dict({"trial": {"val_source": "test_holdout", "test_holdout": 30,
                                          "seed": s}}).trial for s in (0, 1))
    a, b, c = (scored_data(data, t, {"val_source": "test_holdout"}, "synthetic")
               for t in (t0, t0, t1))
    assert torch.equal(a.val.index, b.val.index) and not torch.equal(a.val.index, c.val.index)
    assert len(a.val.index) == 30 and len(a.test.index) == 90 and a.val.x is data.test.x
    with pytest.raises(UserError, match=r"^the test split of synthetic has 120 images, but the "
                                        r"search chose on 30 of 100; use the data the search"):
        scored_data(data, t0, {"val_source": "test_holdout", "choose_images": 30,
                               "report_images": 70}, "synthetic")


def _key(x: torch.Tensor, y: torch.Tensor) -> list[tuple]:
    return [(int(c),) + tuple(round(v, 4) for v in row.tolist())
            for c, row in zip(y, x.flatten(1)[:, :12])]


class _Trace:
    """Wraps ``fit`` and ``evaluate`` where the pipeline and the loop call them: which batches each one received."""

    def __init__(self, monkeypatch):
        from sketch_core.training import loop as train

        self.fits: list = []      # the Data objects fit trained and chose on
        self.evals: list = []     # (loader, image keys) of every evaluate call
        real_fit, real_eval = train.fit, train.evaluate

        def fit(model, data, *args, **kw):
            self.fits.append(data)
            return real_fit(model, data, *args, **kw)

        def evaluate(model, batches, *args, **kw):
            served = list(batches)
            self.evals.append((batches, {k for x, y in served for k in _key(x, y)}))
            return real_eval(model, served, *args, **kw)

        from sketch_core import pipeline

        for module in (train, pipeline):  # fit's own evaluations and the pipeline's
            monkeypatch.setattr(module, "fit", fit)
            monkeypatch.setattr(module, "evaluate", evaluate)

    def keys(self, role: str) -> set:
        """Images evaluated as some fit's ``val`` (role 'val') or ``test`` (role 'test')."""
        loaders = [getattr(d, role) for d in self.fits]
        return {k for loader, keys in self.evals if any(loader is seen for seen in loaders)
                for k in keys}


def _all_test_keys() -> set:
    data = load_data("synthetic", synthetic=SYNTH, val_fraction=0.0, eval_batch_size=50)
    return {k for x, y in data.test for k in _key(x, y)}


@pytest.mark.cluster  # its data-parallel retrain starts Ray
def test_choosing_and_reporting_images_never_meet(tmp_path, monkeypatch, capsys,
                                                   one_torch_thread):
    """auto with a record-less checkpoint: trials and the retrain's best epoch choose on
    40 held-out test images, the retrain reports on the other 80 only."""
    from search.run.local_loop import run_local
    from search.run.retrain import retrain_experiment

    bare = _checkpoint(tmp_path / "bare.pt", None)
    config = _config(tmp_path, f"model.pretrained={bare}", "trial.test_holdout=40",
                     "trial.epochs=1", "sketch.calibration_batches=1", "trial.batch_size=32",
                     "budget.num_samples=2", "space.paper_rates=['[0.5]*9']",
                     "sampler.anchors=0", "retrain.batch_size=32")
    trials = _Trace(monkeypatch)
    run_local(config, tmp_path / "exp", quiet=True)
    out = capsys.readouterr().out
    assert ("[search] scores: val_source test_holdout: 40 test images choose, the other 80 "
            "report, because model.pretrained records no training split") in out
    assert len(trials.fits) == 2 and not trials.keys("test")  # no trial looked at its test set
    trial_choose = trials.keys("val")
    for data in trials.fits:  # nothing of the training split is held out
        assert data.train.index.tolist() == list(range(SYNTH["n_train"]))

    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    scores = manifest["scores"]
    assert (scores["val_source"], scores["choose_images"], scores["report_images"]) == (
        "test_holdout", 40, 80)
    assert "no training split" in scores["reason"] and manifest["baseline"]["scores"] == scores
    from search.experiment.resolve import plan_search  # what a resumed search's trials load
    from search.run.trial import _CACHE, trial_data, trial_setup

    _CACHE.clear()
    plan = plan_search(config, manifest["baseline"], tmp_path / "exp", "exp", str(tmp_path))
    resumed = trial_data(trial_setup(plan), "cpu")
    assert {k for x, y in resumed.val for k in _key(x, y)} == trial_choose

    retrain = _Trace(monkeypatch)
    result = retrain_experiment(tmp_path / "exp", "best", epochs=1, quiet=True)
    choose, report = retrain.keys("val"), retrain.keys("test")
    everything = _all_test_keys()
    assert len(everything) == SYNTH["n_test"]  # the pixels tell every image apart
    assert len(trial_choose) == 40 and choose == trial_choose  # the same 40 choose everywhere
    assert len(report) == 80 and not choose & report and choose | report == everything
    assert (result["val_source"], result["test_images"], result["val_images"]) == (
        "test_holdout", 80, 40)

    # the data-parallel retrain (two Ray workers) chooses and reports on the same images
    parallel = retrain_experiment(tmp_path / "exp", "best", epochs=1, quiet=True, workers=2)
    assert (parallel["val_source"], parallel["test_images"], parallel["val_images"]) == (
        "test_holdout", 80, 40)
    assert parallel["widths"] == result["widths"] and parallel["flops"] == result["flops"]

    from search.results.dataframe import load_results

    df = load_results(tmp_path / "exp")
    assert set(df["val_source"]) == {"test_holdout"}
    retrained = df[df["test_acc"].notna()]
    assert len(retrained) == 1 and int(retrained["test_images"].iloc[0]) == 80


def test_train_holdout_chooses_inside_the_training_split(tmp_path, monkeypatch,
                                                         one_torch_thread):
    """The default for a baseline pretrained here: trials choose on the training holdout,
    the whole test split is never evaluated by a trial."""
    from conftest import trial_setup_for
    from search.run.trial import train_trial

    config = _config(tmp_path)
    data = load_data("synthetic", synthetic=SYNTH, val_fraction=0.1, eval_batch_size=50)
    entry = resolve_arch("resnet20", "synthetic", input_size=8)
    model = entry.build(None, SYNTH["num_classes"], SYNTH["channels"])
    t = config.trial.model_copy(update={"epochs": 1, "batch_size": 32})
    sk = config.sketch.model_copy(update={"calibration_batches": 1})
    setup = trial_setup_for("resnet20", "synthetic", 4, 1, synthetic=SYNTH, trial=t, sketch=sk,
                            input_size=8, baseline_key="untrained")
    trace = _Trace(monkeypatch)
    reports: list = []
    train_trial([0.5] * 9, setup, model.state_dict(), lambda m, f: reports.append(m))
    assert reports and not reports[-1]["failed"], reports
    assert not trace.keys("val") & _all_test_keys() and not trace.keys("test")
    assert len(trace.keys("val")) == 16 == len(data.val.index)


@pytest.mark.cluster  # each starts a local Ray instance (about 10 s)
@pytest.mark.parametrize("sets, message", [
    (["trial.val_source=test_holdout", "trial.test_holdout=120"],
     ("error: trial.test_holdout: 120 is not smaller than the test split (120 images); some "
      "test images must be left to report on")),
    (["trial.val_source=test_holdout", f"model.synthetic={dict(SYNTH, n_test=1)}"],
     ("error: trial.val_source test_holdout needs a test split to hold images out of; data "
      "set synthetic has 1 test image(s) (at least 2 are needed: some choose, the rest "
      "report)")),
])
def test_bad_holdout_is_one_line_exit_2(tmp_path, sets, message):
    """``launch.py search``: one line, exit 2, no experiment folder, nothing pretrained."""
    from conftest import run_launch

    args = ["search", "--config", "quickstart", "--storage_path", str(tmp_path), "--name", "bad",
            "--set", f"model.pretrain.cache_dir={tmp_path / 'cache'}",
            "--set", "model.data_set=synthetic", "--set", f"model.synthetic={SYNTH}"]
    for s in sets:
        args += ["--set", s]
    proc = run_launch(args, timeout=300)
    # Ray's own timestamped log lines (the local instance starts first) aside, one line
    ours = [line for line in proc.stderr.splitlines() if not RAY_LOG.match(line)]
    assert proc.returncode == 2 and ours == [message], proc.stdout[-2000:] + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "cache").exists()


def test_weights_started_from_elsewhere_keep_their_provenance(tmp_path, capsys):
    """``pretrain --init`` and ``sketch`` record the split only when their source's own
    record vouches for it: an adapted public network never passes as a clean one."""
    import launch
    from sketch_core.io.checkpoint import load_checkpoint

    def pretrain(job, *extra):
        argv = ["pretrain", "--data_set", "synthetic", "--arch", "resnet", "--cfg", "resnet20",
                "--num_epochs", "1", "--input_size", "8", "--no_progress", "--job_dir",
                str(tmp_path / job), *extra]
        assert launch.main(argv) == 0, capsys.readouterr()
        return tmp_path / job / "checkpoint" / "model_best.pt"

    def auto(ckpt):
        return choose_val_source(_config(tmp_path, f"model.pretrained={ckpt}"))

    clean = pretrain("scratch")
    assert auto(clean)[0] == "train_holdout"
    loaded = load_checkpoint(clean)
    bare = tmp_path / "public.pt"  # weights with no record, as public files come
    save_checkpoint(str(bare), loaded.model, cfg=loaded.meta["cfg"], data_set="synthetic",
                    num_classes=loaded.meta["num_classes"],
                    in_channels=loaded.meta["in_channels"], split=None)
    source, why = auto(pretrain("adapted", "--init", str(bare)))
    assert source == "test_holdout" and "trained from public.pt, which records no training" in why
    assert auto(pretrain("chained", "--init", str(clean)))[0] == "train_holdout"
    sketched = tmp_path / "sk"
    assert launch.main(["sketch", "--data_set", "synthetic", "--arch", "resnet", "--cfg",
                        "resnet20", "--sketch_model", str(bare), "--sketch_rate", "[0.5]*9",
                        "--sketch_mode", "select", "--num_epochs", "1", "--input_size", "8",
                        "--no_progress",
                        "--job_dir", str(sketched)]) == 0, capsys.readouterr()
    assert auto(sketched / "checkpoint" / "model_best.pt")[0] == "test_holdout"
