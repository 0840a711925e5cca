"""The engine's input: RunSpec from the command line, defaults, checks, pickling, resume."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

import launch
from sketch_core.errors import UserError
from sketch_core.job_spec import DataSpec, ModelSpec, OutputSpec, RunSpec, SketchSpec
from sketch_core.jobs import execute
from sketch_core.options import Recipe
from sketch_core.cli.train_args import spec_from_args
from sketch_core.job_checks import check_spec, preflight
from sketch_core.job_spec import resolve, run_recipe
from sketch_core.jobs import RUN_KEYS


unset = run_recipe  # a recipe that leaves the command's defaults to the job, as the command line does

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parse(*argv):
    command = argv[0]
    return launch.build_parser(command).parse_args([str(a) for a in argv])


def test_command_line_becomes_a_spec():
    spec = spec_from_args(parse(
        "sketch", "--data_set", "cifar10", "--data_path", "d", "--sketch_model", "m.pt",
        "--job_dir", "j", "--cfg", "resnet56", "--sketch_rate", "[0.6]*27", "--lr", "0.02",
        "--lr_decay_step", "75", "112", "--sketch_mode", "select", "--select_by", "channels",
        "--filter_norm", "True", "--no_progress", "--gpus", "0", "--calibration_batches", "3"))
    assert spec.command == "sketch" and spec.gpus == [0]
    assert spec.data == DataSpec(data_set="cifar10", data_path="d")
    assert spec.model == ModelSpec(cfg="resnet56", sketch_model="m.pt")
    assert spec.sketch == SketchSpec(rates="[0.6]*27", mode="select", select_by="channels",
                                     filter_norm=True, calibration_batches=3)
    assert spec.train == unset(lr=0.02, lr_decay_step=(75, 112))
    assert spec.output == OutputSpec(job_dir="j", progress=False)
    pre = spec_from_args(parse("pretrain", "--data_set", "digits"))
    assert pre.command == "pretrain" and pre.sketch is None


def test_defaults_are_the_commands_and_the_spec_is_left_as_given():
    spec = RunSpec(command="pretrain", data=DataSpec(data_set="digits"))
    full = resolve(spec)
    assert (full.train.epochs, full.train.lr, full.train.lr_decay_step) == (40, 0.1, (20, 30))
    assert spec.train.epochs is None
    sk = resolve(RunSpec())
    assert (sk.train.epochs, sk.train.lr, sk.train.lr_decay_step) == (150, 0.01, (50, 100))
    assert sk.sketch == SketchSpec()
    # the command line's defaults and the spec's are the same
    assert resolve(spec_from_args(parse("sketch"))) == sk


def test_a_spec_pickles_as_plain_data():
    spec = RunSpec(sketch=SketchSpec(rates=[0.5] * 9), gpus=[0, 1])
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert dataclasses.asdict(spec)["sketch"]["rates"] == [0.5] * 9


@pytest.mark.parametrize("change, match", [
    (lambda: dict(train=unset(epochs=-1)), r"--num_epochs must be >= 0"),
    (lambda: dict(train=unset(compile="fast")), r"unknown --compile mode 'fast'"),
    (lambda: dict(train=unset(lr_decay_step=[30, 20])), r"increasing order"),
    (lambda: dict(train=unset(batch_size=0)), r"--train_batch_size must be > 0"),
    (lambda: dict(data=DataSpec(eval_batch_size=0)), r"batch sizes must be positive"),
    (lambda: dict(sketch=SketchSpec(mode="bogus")), r"sketch_mode.*valid: sketch, select, select_lsq"),
    (lambda: dict(sketch=SketchSpec(calibration_batches=0)), r"--calibration_batches must be >= 1"),
    (lambda: dict(output=OutputSpec(reset=True), resume="x"), r"--reset would delete"),
    (lambda: dict(command="prune"), r"unknown command 'prune'; valid: sketch, pretrain"),
    (lambda: dict(command="pretrain", sketch=SketchSpec()), r"pretrain .* no sketch options"),
])
def test_bad_specs_are_user_errors(change, match):
    with pytest.raises(UserError, match=match):
        check_spec(dataclasses.replace(RunSpec(), **change()))


def test_preflight_names_the_checkpoint_and_the_rate_count(tmp_path):
    job = OutputSpec(str(tmp_path / "job"))
    spec = RunSpec(data=DataSpec(data_set="digits"), model=ModelSpec(cfg="resnet20"), output=job)
    with pytest.raises(UserError, match="--sketch_model"):
        preflight(spec)
    missing = ModelSpec(cfg="resnet20", sketch_model=str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="missing.pt does not exist"):
        preflight(dataclasses.replace(spec, model=missing))
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"")  # preflight checks that it is there, the rates against the cfg
    spec = dataclasses.replace(spec, model=ModelSpec(cfg="resnet20", sketch_model=str(ckpt)),
                               sketch=SketchSpec(rates="[0.5]*8"))
    with pytest.raises(UserError, match="9 sketch rates, got 8"):
        preflight(spec)
    ready = preflight(dataclasses.replace(spec, sketch=SketchSpec(rates="[0.5]*9")))
    assert ready.train.epochs == 150
    assert not (tmp_path / "job").exists()


def test_execute_resumes_from_the_stored_run_description(tmp_path):
    def spec(**train):
        return RunSpec(command="pretrain",
                       data=DataSpec(data_set="synthetic", input_size=8, num_classes=3),
                       model=ModelSpec("resnet", "resnet20"),
                       train=unset(**{"epochs": 1, **train}),
                       output=OutputSpec(str(tmp_path), progress=False))

    first = execute(spec(), "cpu")
    state = tmp_path / "checkpoint" / "train_state.pt"
    meta = torch.load(state, weights_only=True)["meta"]
    assert set(RUN_KEYS) <= set(meta)  # the run-defining options, as a plain dict
    with pytest.raises(UserError, match="already holds a run"):
        execute(spec(), "cpu")
    with pytest.raises(UserError, match=r"another configuration.*lr: 0\.1 in the checkpoint"):
        execute(dataclasses.replace(spec(lr=0.5), resume=str(state)), "cpu")
    # only the number of epochs may change
    more = execute(dataclasses.replace(spec(epochs=2), resume=str(tmp_path)), "cpu")
    assert (first["epochs"], more["epochs"]) == (1, 2)
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 2
