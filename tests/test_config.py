"""The search's plain-Python parts: config validation, rate space and cost, picks, trial log."""

from __future__ import annotations

import json
import random

import optuna
import pytest

from search.experiment.config import (config_from_dict, config_to_dict, load_config, parse_duration,
                           recipe_hash, resolve_config_path, shipped_configs)
from search.results.picks import knee_record, parse_pick, pareto_records, select_record
from search.results.trials_file import TrialLog, read_records
from search.propose.proposer import outcome
from search.propose.samplers import make_sampler, population_size
from search.propose.space import RateSpace, stage_groups
from search.propose.targets import anchor_points
from sketch_core.errors import UserError
from sketch_core.cost.flops import count_arch
from sketch_core.rates import parse_rates


# ----------------------------------------------------------------------------- config

SEED_CONFIGS = ["quickstart", "cifar10_vgg16", "cifar10_resnet56", "cifar10_resnet110",
                "cifar10_googlenet", "cifar10_densenet40", "imagenet_resnet50"]


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_shipped_configs_load_by_name_and_their_paper_vectors_fit(name):
    assert name in shipped_configs()
    config = load_config(name)
    assert config.source.endswith(f"{name}.yaml")
    space = RateSpace(config.model.cfg, config.model.data_set, low=config.space.low,
                      high=config.space.high, step=config.space.step,
                      grouping=config.space.grouping)
    for text, params in space.paper_points(config.space.paper_rates):
        assert space.rates_from_params(params) == parse_rates(text, config.model.cfg,
                                                              config.model.data_set)


def test_config_round_trips_through_plain_data():
    config = load_config("quickstart", ["trial.epochs=7", "budget.flops_budget=0.5"])
    again = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert config_to_dict(again) == config_to_dict(config)
    assert again.trial.epochs == 7 and again.budget.flops_budget == 0.5


def test_overrides_reach_nested_sections_and_other_imagenet_models():
    config = load_config("imagenet_resnet50", ["model.cfg=resnet101", "model.pretrain.epochs=3"])
    assert config.model.cfg == "resnet101" and config.model.pretrain.epochs == 3


@pytest.mark.parametrize("override, message", [
    (["trial.epoch=3"], "unknown config key 'trial.epoch'; did you mean 'trial.epochs'?"),
    (["schedular.name=asha"], "did you mean 'scheduler'?"),
    (["trial.epochs=three"], "trial.epochs: expected an integer, got 'three'"),
    (["resources.gpu=lots"], "resources.gpu: expected a number"),
    (["space.low=0"], "space.low: 0.0 is outside (0, 1]"),
    (["space.high=1.5"], "space.high: 1.5 is outside (0, 1]"),
    (["budget.flops_budget=2"], "budget.flops_budget: 2.0 is outside (0, 1]"),
    (["space.low=0.9", "space.high=0.5"], "low 0.9 is above high 0.5"),
    (["sampler.name=nsga"], "did you mean 'nsga2'?"),
    (["sketch.select_by=filter"], "did you mean 'filters'?"),
    (["budget.time=soon"], "cannot parse 'soon'"),
    (["retrain.pick=median"], "expected knee, best, flops<=F"),
    (["trial=3"], "expected section.key=value"),
])
def test_bad_config_values_are_one_clear_user_error(override, message):
    with pytest.raises(UserError) as err:
        load_config("quickstart", override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_config_choices_are_the_cores():
    """The config validates without importing torch; its lists must be sketch_core's."""
    import search.experiment.config as cfg
    import sketch_core.options as core

    assert cfg.MODES == core.MODES
    assert cfg.RANDOM_RULES == core.RANDOM_RULES
    assert cfg.SELECT_BY == core.SELECT_BY
    assert cfg.NORMS == core.WEIGHT_NORMS


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(UserError, match="did you mean 'quickstart'"):
        resolve_config_path("quickstrat")
    other = tmp_path / "mine.yaml"
    other.write_text("model: {cfg: resnet20, data_set: digits}\n")
    assert load_config(str(other)).model.cfg == "resnet20"


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("4h", 14400),
                                           ("1h30m", 5400), ("45", 45), (" 2m 10s ", 130)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "-5", "0s", "5m ago"])
def test_bad_durations(text):
    with pytest.raises(UserError, match="--budget"):
        parse_duration(text)


def test_recipe_hash_changes_with_the_recipe_only():
    a = load_config("quickstart")
    assert recipe_hash(a) == recipe_hash(load_config("quickstart", ["trial.epochs=9"]))
    assert recipe_hash(a) != recipe_hash(load_config("quickstart", ["model.pretrain.epochs=9"]))
    assert recipe_hash(a) != recipe_hash(load_config("quickstart", ["trial.val_fraction=0.2"]))



def test_recipe_hash_is_stable_across_releases():
    """The hash keys the cache of pretrained baselines: the same recipe, the same key."""
    assert recipe_hash(load_config("quickstart")) == "b6dc31e4d9611869"


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_loads_and_round_trips_through_yaml(name):
    import yaml

    config = load_config(name)
    data = config_to_dict(config)
    assert list(data) == ["model", "sketch", "space", "sampler", "budget", "trial", "scheduler",
                          "resources", "storage", "retrain", "latency", "objectives"]
    assert "source" not in data
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(data, sort_keys=False)))
    assert config_to_dict(again) == data and again.source is None


def test_config_literals_are_built_from_the_cores_lists():
    import typing

    from search.experiment.config import ModelConfig, SketchConfig
    from sketch_core.data.sets import DATA_SETS
    from sketch_core.options import MODES, RANDOM_RULES, SELECT_BY, WEIGHT_NORMS

    def choices(model, key):
        tp = model.model_fields[key].annotation
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return typing.get_args(args[0]) if typing.get_origin(tp) is not typing.Literal else \
            typing.get_args(tp)

    assert choices(ModelConfig, "data_set") == DATA_SETS
    assert choices(SketchConfig, "mode") == MODES
    assert choices(SketchConfig, "select_by") == SELECT_BY
    assert choices(SketchConfig, "random_rule") == RANDOM_RULES
    assert choices(SketchConfig, "weight_norm_method") == WEIGHT_NORMS


@pytest.mark.parametrize("override, message", [
    (["model.cfg=resnt20"], "config key model.cfg: unknown --cfg 'resnt20' for data set digits"),
    (["model.cfg=resnt20"], "did you mean 'resnet20'?"),
    (["model.cfg=resnet57"], "config key model.cfg: CIFAR ResNet depth must be 6n+2"),
    (["model.data_set=imagenet", "model.cfg=resnt20"],
     "config key model.cfg: unknown --cfg 'resnt20' for data set imagenet (imagenet family)"),
    (["model.data_set=cifar"], "'cifar' is not one of cifar10, imagenet, folder, digits, "
                               "synthetic; did you mean 'cifar10'?"),
    (["sketch.weight_norm_method=l3"], "is not one of max, sum, l2, l1, l2_2, 2max"),
    (["trial.epochs='3'"], "trial.epochs: expected an integer, got '3' (str)"),
    (["trial.epochs=true"], "trial.epochs: expected an integer, got True (bool)"),
    (["trial.epochs=2.5"], "trial.epochs: expected an integer, got 2.5 (float)"),
    (["trial.threads=x"], "trial.threads: expected an integer (or null), got 'x' (str)"),
    (["trial.lr=0"], "trial.lr: expected a positive value, got 0.0"),
    (["trial.epochs=-1"], "trial.epochs: expected a non-negative value, got -1"),
    (["retrain.epochs=0"], "retrain.epochs: expected at least 1, got 0"),
    (["model.pretrain.epochs=0"], "model.pretrain.epochs: expected at least 1, got 0"),
    (["trial.val_fraction=1"], "trial.val_fraction: 1.0 is outside (0, 1)"),
    (["trial.lr_decay_step=[1, x]"], "trial.lr_decay_step[1]: expected an integer, got 'x'"),
    (["model.download=maybe"], "model.download: expected a boolean (true/false), got 'maybe'"),
    (["model.pretrain=4"], "config section model.pretrain: expected a mapping, got 4 (int)"),
    (["model.pretrain.lol=1"], "unknown config key 'model.pretrain.lol'; valid keys of "
                               "model.pretrain: epochs, lr,"),
    (["space.step=0.95"], "space.step: 0.95 is larger than the range [0.1, 1.0]"),
    (["sampler.population_size=1"], "sampler.population_size: expected at least 2, got 1"),
    (["scheduler.reduction_factor=1"], "scheduler.reduction_factor: expected at least 2, got 1"),
    (["budget.time=null", "budget.num_samples=null"], "budget.num_samples/budget.time: give one "
                                                      "or both; without either"),
    (["budget.time=90"], "budget.time: expected a string (or null), got 90 (int)"),
    (["resources.gpu=1.5"], "resources.gpu: 1.5 GPUs; fractions are for sharing one GPU"),
    (["resources.cpu=0", "resources.gpu=0"], "resources.cpu/resources.gpu: a trial must ask"),
    (["storage.name=a/b"], "storage.name: 'a/b' is not a folder name"),
    (["storage.storage_path=''"], "storage.storage_path: must not be empty"),
    (["retrain.pick='flops<=150%'"], "--pick flops<=150%: '150%' is above 100%"),
    (["source.x=1"], "unknown config key 'source'"),
])
def test_more_config_errors_name_the_key_the_expectation_and_the_value(override, message):
    with pytest.raises(UserError) as err:
        load_config("quickstart", override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_values_yaml_and_the_original_spell_differently_are_accepted():
    config = load_config("quickstart", ["trial.epochs=4.0", "model.download='True'",
                                        "sketch.filter_norm=False", "resources.cpu=2",
                                        "retrain.lr_decay_step=[10.0]"])
    assert config.trial.epochs == 4 and isinstance(config.trial.epochs, int)
    assert config.model.download is True and config.sketch.filter_norm is False
    assert config.resources.cpu == 2.0 and isinstance(config.resources.cpu, float)
    assert config.retrain.lr_decay_step == [10]
    empty = config_from_dict({"trial": None, "model": {"cfg": "resnet20", "data_set": "digits"}})
    assert empty.trial.epochs == 3 and empty.model.cfg == "resnet20"
    assert config_from_dict(None).model.cfg == "resnet56"


def test_assignments_are_validated_and_the_source_is_no_key():
    from pydantic import ValidationError

    config = load_config("quickstart")
    config.model.pretrained = "baseline.pt"
    config.storage.name = "run1"
    assert config.model.pretrained == "baseline.pt" and config.storage.name == "run1"
    with pytest.raises(ValidationError):
        config.trial.epochs = "many"
    config.source = "elsewhere.yaml"
    assert config.source == "elsewhere.yaml" and "source" not in config_to_dict(config)
    assert config.time_budget_s == 600.0


# ----------------------------------------------------------------------------- space and cost

@pytest.mark.parametrize("cfg, data_set, kw", [
    ("resnet20", "digits", dict(in_channels=1, input_size=8)),
    ("resnet56", "cifar10", {}), ("vgg16", "cifar10", {}), ("googlenet", "cifar10", {}),
    ("densenet40", "cifar10", {}), ("resnet50", "imagenet", {}), ("googlenet", "imagenet", {}),
])
def test_cost_model_equals_counting_the_built_network(cfg, data_set, kw):
    space = RateSpace(cfg, data_set, round_to=1, **kw)
    rng = random.Random(cfg)
    for _ in range(3):
        rates = [rng.choice(space.grid) for _ in range(space.num_units)]
        cost = space.cost(rates)
        assert (cost.flops, cost.params) == count_arch(cfg, data_set, list(cost.widths), None,
                                                       kw.get("in_channels", 3),
                                                       kw.get("input_size"))
    full = space.cost([1.0] * space.num_units)
    assert full.flops_ratio == 1.0 and full.params_ratio == 1.0


def test_cost_model_matches_with_rounded_widths_and_last_unit_kept():
    space = RateSpace("resnet56", "cifar10", round_to=8, sketch_lastconv=False)
    rates = [0.3] * 27
    cost = space.cost(rates)
    assert all(w % 8 == 0 for w in cost.widths[:-1])
    assert cost.widths[-1] == 64
    assert (cost.flops, cost.params) == count_arch("resnet56", "cifar10", list(cost.widths))


def test_stage_grouping():
    assert [len(g) for g in stage_groups("resnet56")] == [9, 9, 9]
    assert [len(g) for g in stage_groups("densenet40")] == [12, 12, 12]
    assert [len(g) for g in stage_groups("googlenet")] == [2, 5, 2]
    assert [len(g) for g in stage_groups("resnet50", "imagenet")] == [3, 4, 6, 3]
    space = RateSpace("resnet56", grouping="per_stage")
    assert space.param_names == ["stage_00", "stage_01", "stage_02"]
    assert space.expand([0.3, 0.5, 0.7]) == [0.3] * 9 + [0.5] * 9 + [0.7] * 9
    assert space.params_from_rates([0.3] * 9 + [0.5] * 9 + [0.7] * 9) == \
        {"stage_00": 0.3, "stage_01": 0.5, "stage_02": 0.7}
    assert space.params_from_rates([0.3] * 26 + [0.5]) is None
    with pytest.raises(UserError, match="per_stage"):
        space.paper_points(["[0.5]*26+[0.6]"])


def test_paper_vector_outside_the_space_is_a_user_error():
    space = RateSpace("resnet56", low=0.3, high=1.0, step=0.1)
    with pytest.raises(UserError, match="outside the space"):
        space.paper_points(["[0.25]*27"])


def test_define_by_run_space_samples_on_the_grid():
    space = RateSpace("resnet20", "digits", low=0.1, high=1.0, step=0.05, in_channels=1,
                      input_size=8)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        rates = space(trial)["rates"]
        assert len(rates) == 9 and space.in_space(rates)
        assert all(r == round(r, 10) for r in rates)
        study.tell(trial, [0.5, 1.0])


def test_repair_meets_the_budget_on_the_grid_and_keeps_feasible_vectors():
    space = RateSpace("resnet56", low=0.1, high=1.0, step=0.05)
    rates = [0.9] * 9 + [1.0] * 9 + [0.8] * 9
    fixed = space.repair(rates, 0.5)
    assert space.cost(fixed).flops_ratio <= 0.5 and space.in_space(fixed)
    assert space.cost(fixed).flops_ratio > 0.4  # as large as fits, not anything small
    assert all(f <= r for f, r in zip(fixed, rates))
    small = [0.3] * 27
    assert space.repair(small, 0.5) == small
    assert space.repair(rates, 0.001) is None
    with pytest.raises(UserError, match="even every rate at space.low"):
        space.check_budget(0.001)


def test_sampler_population_is_sized_to_the_budget():
    assert population_size(32) == 8 and population_size(8) == 4 and population_size(1000) == 50
    assert population_size(None) == 20 and population_size(32, 12) == 12
    assert make_sampler("nsga2", 0, 32)._population_size == 8
    assert isinstance(make_sampler("tpe", 0, 32), optuna.samplers.TPESampler)
    assert isinstance(make_sampler("random"), optuna.samplers.RandomSampler)


def test_outcome_tells_early_stops_as_pruned():
    from optuna.trial import TrialState

    full = {"val_acc": 0.9, "flops": 100, "epoch": 3}
    assert outcome(full, False, 3)[:2] == (TrialState.COMPLETE, [0.9, 100.0])
    assert outcome({**full, "epoch": 1}, False, 3)[0] == TrialState.PRUNED
    assert outcome({**full, "failed": True}, False, 3)[0] == TrialState.FAIL
    assert outcome(full, True, 3)[0] == TrialState.FAIL
    assert outcome(None, False, 3)[0] == TrialState.FAIL
    assert outcome({**full, "val_acc": float("nan")}, False, 3)[0] == TrialState.FAIL


# ----------------------------------------------------------------------------- picks

def _rec(tid, acc, fr, status="completed"):
    return {"trial_id": tid, "status": status, "val_acc": acc, "flops_ratio": fr,
            "rates": [fr], "widths": [1]}


RECORDS = [_rec("a", 0.60, 0.20), _rec("b", 0.90, 0.40), _rec("c", 0.93, 0.70),
           _rec("d", 0.94, 1.00), _rec("e", 0.80, 0.50), _rec("f", 0.99, 0.10, "stopped"),
           _rec("g", None, 0.3, "failed")]


def test_pareto_and_knee():
    assert [r["trial_id"] for r in pareto_records(RECORDS)] == ["a", "b", "c", "d"]
    # scaled to [0, 1]: a (0, 0), b (0.25, 0.882), c (0.625, 0.971), d (1, 1); b is farthest
    assert knee_record(RECORDS)["trial_id"] == "b"
    assert select_record(RECORDS, "knee")["trial_id"] == "b"
    assert select_record(RECORDS, "best")["trial_id"] == "d"
    assert select_record(RECORDS, "flops<=0.5")["trial_id"] == "b"
    assert select_record(RECORDS, "flops<=0.2")["trial_id"] == "a"
    assert select_record(RECORDS, "trial=f")["trial_id"] == "f"


@pytest.mark.parametrize("pick, message", [
    ("flops<=0.05", "no completed trial is that small"),
    ("trial=zzz", "no such trial"),
    ("flops<=150%", "is above 100%"),
    ("flops<=3ms", "milliseconds, which bound a latency"),
    ("flops<=2", "carry no flops"),
    ("middle", "expected knee, best"),
])
def test_bad_picks(pick, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        select_record(RECORDS, pick)


def test_pick_labels():
    assert parse_pick("flops<=0.5").label == "flops_le_0.5"
    assert parse_pick("trial=ab12").label == "trial_ab12"


# ----------------------------------------------------------------------------- trial log

def test_trial_log_appends_once_and_readers_skip_a_cut_line(tmp_path):
    path = tmp_path / "trials.jsonl"
    log = TrialLog(path)
    assert log.append({"trial_id": "a", "status": "completed", "val_acc": float("nan")})
    assert not log.append({"trial_id": "a", "status": "stopped"})
    assert TrialLog(path).append({"trial_id": "b", "status": "failed"})
    assert not TrialLog(path).append({"trial_id": "b", "status": "failed"})
    with open(path, "a") as f:
        f.write('{"trial_id": "c", "status": "compl')  # a driver killed mid-write
    records = read_records(path)
    assert [r["trial_id"] for r in records] == ["a", "b"]
    assert records[0]["val_acc"] is None  # NaN is not JSON
    written = json.loads(path.read_text().splitlines()[0])
    assert set(written) >= {"trial_id", "status", "rates", "widths", "flops", "node", "ended"}
    assert read_records(tmp_path / "missing.jsonl") == []


def test_anchor_points_are_uniform_vectors_spread_by_cost_none_unpruned():
    space = RateSpace("resnet56", low=0.2, high=1.0, step=0.05)
    points = anchor_points(space, 4)
    texts = [text for text, _ in points]
    assert texts[0] == "[0.2]*27" and texts[-1] == "[0.95]*27" and len(texts) == 4
    costs = []
    for text, params in points:
        rates = space.rates_from_params(params)
        assert rates == parse_rates(text, "resnet56") and space.in_space(rates)
        costs.append(space.cost(rates).flops_ratio)
    # evenly spread by MACs: each anchor is the dearest grid rate at or below its target
    lo, hi = costs[0], costs[-1]
    for k, c in enumerate(costs[1:-1], 1):
        target = lo + (hi - lo) * k / 3
        r = space.rates_from_params(points[k][1])[0]
        assert c <= target + 1e-9 < space.cost([r + 0.05] * 27).flops_ratio
    assert anchor_points(space, 0) == []
    assert all(c < 1 for c in costs)
    within = anchor_points(space, 3, budget=0.5)
    assert max(space.cost(space.rates_from_params(p)).flops_ratio for _, p in within) <= 0.5
    staged = anchor_points(RateSpace("resnet56", grouping="per_stage"), 2)
    assert [p for _, p in staged] == [{"stage_00": 0.2, "stage_01": 0.2, "stage_02": 0.2},
                                      {"stage_00": 0.95, "stage_01": 0.95, "stage_02": 0.95}]
