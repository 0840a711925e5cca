"""The training loop: learning, determinism, exact resume, best tracking, NaN, files written."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from sketch_core.data.sets import load_data
from sketch_core.errors import UserError
from sketch_core.training.loop import (TrainingDiverged, TrainingInterrupted, evaluate, fit, load_state)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest
SYN = dict(n_train=384, n_test=128, num_classes=4, channels=3, size=8)


def tiny_model(num_classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))


@pytest.fixture()
def data():
    return load_data("synthetic", synthetic=SYN, batch_size=32, eval_batch_size=50)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_fit_learns_and_returns_the_best_epoch(data, tmp_path):
    model = tiny_model()
    before = evaluate(model, data.val)["acc"]
    seen = []
    result = fit(model, data, epochs=6, lr=0.05, lr_decay_step=[4], job_dir=tmp_path,
                 progress=False, on_epoch=lambda e, m: seen.append((e, m)))
    assert result.best_val_acc > max(0.45, before + 0.2)  # chance is 0.25
    assert [e for e, _ in seen] == list(range(6))
    assert [m["lr"] for _, m in seen] == pytest.approx([0.05] * 4 + [0.005] * 2)
    best = max(m["val_acc"] for _, m in seen)
    assert result.best_val_acc == best
    assert seen[result.best_epoch][1]["is_best"]
    # best_state holds the weights of the best epoch, not the last
    model.load_state_dict(result.best_state)
    assert evaluate(model, data.val)["acc"] == pytest.approx(best)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(6))
    assert float(rows[-1]["best_val_acc"]) == pytest.approx(best)


def test_fit_is_deterministic_under_a_seed(data):
    a, b = tiny_model(), tiny_model()
    fit(a, data, epochs=2, progress=False, seed=3)
    fit(b, data, epochs=2, progress=False, seed=3)
    assert same(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("stop_at", [(1, 0), (2, 5)])  # (epoch, batch) of the interruption
def test_interrupted_and_resumed_equals_straight(data, tmp_path, stop_at):
    straight = tiny_model()
    r1 = fit(straight, data, epochs=4, lr=0.05, lr_decay_step=[2], progress=False, seed=1)
    calls = {"n": 0}
    target = stop_at[0] * len(data.train) + stop_at[1]

    def stop():
        calls["n"] += 1
        return calls["n"] >= target

    path = tmp_path / "state.pt"
    model = tiny_model()
    with pytest.raises(TrainingInterrupted) as info:
        fit(model, data, epochs=4, lr=0.05, lr_decay_step=[2], progress=False, seed=1,
            state_path=path, state_meta={"who": "test"}, stop=stop)
    state = torch.load(path, weights_only=True)  # plain tensors and numbers only
    assert (info.value.epoch, info.value.batch) == (state["epoch"], state["batch"])
    assert state["meta"] == {"who": "test"}
    # the resumed process starts from a fresh model and fresh RNG
    torch.manual_seed(12345)
    resumed = tiny_model(seed=99)
    r2 = fit(resumed, data, epochs=4, lr=0.05, lr_decay_step=[2], progress=False, seed=1,
             start_state=load_state(path), state_path=path)
    assert same(straight.state_dict(), resumed.state_dict())
    assert same(r1.best_state, r2.best_state)
    assert [m["val_acc"] for m in r1.history] == [m["val_acc"] for m in r2.history]
    assert load_state(path)["epoch"] == 4


class Exploding(nn.Module):
    """Produces NaN logits from its third epoch on (counted in training forwards)."""

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, 4)
        self.steps, self.calls = steps_per_epoch, 0

    def forward(self, x):
        out = self.lin(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls > 2 * self.steps:
                out = out * float("nan")
        return out


def test_nan_loss_stops_with_the_epoch_and_keeps_the_last_good_state(data, tmp_path):
    model = Exploding(len(data.train))
    path = tmp_path / "state.pt"
    with pytest.raises(TrainingDiverged, match="epoch 3") as info:
        fit(model, data, epochs=5, progress=False, state_path=path, job_dir=tmp_path)
    assert isinstance(info.value, UserError)
    state = load_state(path)
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert len(list(csv.DictReader(open(tmp_path / "metrics.csv")))) == 2


def test_evaluate_top1_top5_and_loss():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):  # logits rank class 0 > 1 > ... > 6
            return torch.arange(7, 0, -1).float().expand(len(x), 7) + 0 * self.w

    y = torch.tensor([0, 1, 4, 5, 6])
    batches = [(torch.zeros(3, 1), y[:3]), (torch.zeros(2, 1), y[3:])]
    out = evaluate(Fixed(), batches, "cpu")
    logits = torch.arange(7, 0, -1).float().expand(5, 7)
    assert out["acc"] == pytest.approx(1 / 5) and out["top5"] == pytest.approx(3 / 5)
    assert out["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)))


def test_bad_schedule_and_epochs(data):
    with pytest.raises(UserError, match="increasing order"):
        fit(tiny_model(), data, epochs=2, lr_decay_step=[5, 3], progress=False)
    with pytest.raises(UserError, match="epochs must be >= 0"):
        fit(tiny_model(), data, epochs=-1, progress=False)


def test_no_validation_split_keeps_the_last_epoch(tmp_path):
    d = load_data("synthetic", synthetic=SYN, batch_size=32, val_fraction=0.0)
    model = tiny_model()
    result = fit(model, d, epochs=2, progress=False)
    assert result.best_val_acc is None and result.best_epoch == 1
    assert same(result.best_state, model.state_dict())


def test_a_recipe_equals_its_keywords_and_hooks_see_every_event(data):
    from sketch_core.training.hooks import Hook
    from sketch_core.options import Recipe

    class Record(Hook):
        def __init__(self):
            self.events = []

        def on_fit_start(self, run):
            self.events.append("start")

        def on_epoch_start(self, run):
            self.events.append(("epoch", run.epoch, run.batch))

        def on_batch_end(self, run):
            self.events.append("batch")

        def on_epoch_end(self, run):
            self.events.append(("row", run.metrics["epoch"], run.metrics["val_acc"] is not None))

        def on_fit_end(self, run):
            self.events.append("end")

    kw, by_kw = dict(epochs=2, lr=0.05, lr_decay_step=[1], seed=4), tiny_model()
    fit(by_kw, data, progress=False, **kw)
    record, by_recipe = Record(), tiny_model()
    # keywords override the recipe's fields
    result = fit(by_recipe, data, Recipe(epochs=5, lr=0.05, lr_decay_step=(1,), seed=4),
                 epochs=2, progress=False, hooks=[record])
    assert same(by_kw.state_dict(), by_recipe.state_dict()) and result.epochs == 2
    n = len(data.train)
    assert record.events == ["start", ("epoch", 0, 0), *["batch"] * n, ("row", 0, True),
                             ("epoch", 1, 0), *["batch"] * n, ("row", 1, True), "end"]
    with pytest.raises(UserError, match="increasing order"):
        Recipe(epochs=1, lr_decay_step=[3, 2])
