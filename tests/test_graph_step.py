"""The graph training step on the CPU: its update, its check, its fallbacks, its plumbing.

The CUDA graph itself needs a GPU (tests/test_cuda.py); here the capture is replaced by
a stand-in that replays by running the captured step again, so the warm-up, the check
against the eager step, the learning-rate tensor and every fallback run on the CPU.
"""

from __future__ import annotations

import logging
import typing

import pytest
import torch
from torch import nn

from search.experiment.config import TrialConfig, config_from_dict
from sketch_core.options import STEPS
from sketch_core.training.cuda_graph import GraphStep, graph_unavailable, sgd_update_
from sketch_core.data.sets import load_data
from sketch_core.errors import UserError
from sketch_core.options import Recipe
from sketch_core.training.loop import Run, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SYN = dict(n_train=200, n_test=64, num_classes=4, channels=3, size=8)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))


@pytest.fixture()
def data():
    return load_data("synthetic", synthetic=SYN, batch_size=32, eval_batch_size=64)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Rerun:
    """A capturer that replays by running the step again (what a graph replay computes)."""

    made = 0

    def __init__(self):
        Rerun.made += 1

    def capture(self, fn):
        self.fn = fn

    def replay(self):
        return self.fn()


class Skewed(Rerun):
    """A replay that gets the update wrong: the check must catch it."""

    def replay(self):
        out = self.fn()
        with torch.no_grad():
            for p in self.params:
                p.add_(1e-2)
        return out


class Broken(Rerun):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-4), (0.0, 0.0), (0.5, 1e-2)])
def test_the_foreach_update_is_torch_sgd(momentum, weight_decay):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    mine = [p.clone() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    bufs = [None, None]
    for step, lr in enumerate([0.1, 0.1, 0.03, 0.03]):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        if step == 0 and momentum:  # the first step makes the buffers (as the eager warm-up)
            bufs = [g + weight_decay * p for g, p in zip(grads, mine)]
            torch._foreach_add_(mine, torch._foreach_mul(bufs, -lr))
        else:
            sgd_update_(mine, grads, bufs, torch.tensor(-lr), momentum=momentum,
                        weight_decay=weight_decay)
        for m, r in zip(mine, ref):
            assert torch.allclose(m, r.detach(), rtol=1e-6, atol=1e-7)
        if momentum:
            for b, r in zip(bufs, ref):
                assert torch.allclose(b, opt.state[r]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_asking_for_the_graph_step_on_the_cpu_runs_eager_and_says_so(data, caplog):
    a, b = tiny_model(), tiny_model()
    fit(a, data, epochs=2, lr=0.05, lr_decay_step=[1], progress=False)
    with caplog.at_level(logging.WARNING, logger="sketchtune"):
        fit(b, data, epochs=2, lr=0.05, lr_decay_step=[1], progress=False, step="graph")
    lines = [r.getMessage() for r in caplog.records if "graph step" in r.getMessage()]
    assert lines == ["graph step asked for, but it needs a CUDA device and this run is on cpu: "
                     "running eager steps"]
    assert same(a.state_dict(), b.state_dict())  # the CPU path is the eager path, bit for bit


def test_the_step_option_is_checked():
    assert Recipe(epochs=1).step == "eager"
    with pytest.raises(UserError, match=r"one of eager, graph, got 'grpah'; did you mean 'graph'"):
        Recipe(epochs=1, step="grpah")
    assert TrialConfig(step="graph").step == "graph"
    assert typing.get_args(TrialConfig.model_fields["step"].annotation) == STEPS
    with pytest.raises(UserError, match=r"trial.step: 'fast' is not one of eager, graph"):
        config_from_dict({"trial": {"step": "fast"}})


def test_graph_unavailable_names_the_reason():
    cpu = torch.device("cpu")
    assert "CUDA device" in graph_unavailable(cpu)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert graph_unavailable(cuda) is None
        assert "data parallelism" in graph_unavailable(cuda, distributed=True)
        assert "torch.compile" in graph_unavailable(cuda, compiled="reduce-overhead")


def _run(data, capture, epochs=2):
    """A Run on the CPU whose step is a GraphStep with the given capturer; train it."""
    model = tiny_model()
    run = Run(model, data, Recipe(epochs=epochs, lr=0.05, lr_decay_step=(1,)),
              torch.device("cpu"))
    run.step = GraphStep(run.raw, run.optimizer, run.criterion, run.eager_step, run.device,
                         amp=False, batch_size=data.train.batch_size, capture=capture)
    if capture is Skewed:
        Skewed.params = list(model.parameters())
    losses = []
    for epoch in range(epochs):
        run.begin_epoch(epoch)
        for run.batch, (x, y) in enumerate(data.train):
            x = x.contiguous(memory_format=torch.channels_last)
            out, loss = run.step(x, y)
            losses.append(float(loss.detach()))
        run.end_epoch()
    return run, losses


def _eager(data, epochs=2):
    model = tiny_model()
    fit(model, data, epochs=epochs, lr=0.05, lr_decay_step=[1], progress=False)
    return model


def test_the_replayed_step_trains_as_the_eager_step_and_follows_the_schedule(data, caplog):
    with caplog.at_level(logging.WARNING, logger="sketchtune"):
        run, _ = _run(data, Rerun)
    step = run.step
    assert step.fallback is None and not caplog.records
    # 180 training images in batches of 32: five full ones, the sixth (20 images) eager
    assert data.train.batch_size == 32 and len(data.train) == 5 + 1
    assert step.warm == 3 and step.replays == 2 * 5 - 3  # warm-up, then every full batch
    assert float(step.neg_lr) == pytest.approx(-0.005)  # the decayed rate reached the graph
    ref = _eager(data)
    got, want = run.raw.state_dict(), ref.state_dict()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k
    momentum = [run.optimizer.state[p]["momentum_buffer"] for p in run.raw.parameters()]
    assert all(b is not None for b in momentum)  # the optimizer's own buffers, saved as ever


@pytest.mark.parametrize("capture,reason", [
    (Skewed, "disagrees with the eager step (the updated state is off by"),
    (Broken, "the capture failed (RuntimeError: operation not permitted")])
def test_a_capture_that_disagrees_or_fails_falls_back_to_eager(data, caplog, capture, reason):
    with caplog.at_level(logging.WARNING, logger="sketchtune"):
        run, _ = _run(data, capture)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("graph step: it " if capture is Skewed
                                                   else "graph step: the capture failed")
    assert reason in lines[0] and lines[0].endswith("; running eager steps")
    assert run.step.fallback is not None and run.step.capturer is None
    # the eager result of the checked batch was kept: the run is the eager run exactly
    assert same(run.raw.state_dict(), _eager(data).state_dict())


def test_a_trial_passes_the_step_option_to_fit(caplog):
    from conftest import trial_setup_for
    from search.experiment.config import SketchConfig
    from search.run.trial import train_trial
    from sketch_core.registry import resolve_arch

    torch.manual_seed(0)
    baseline = resolve_arch("resnet20", "synthetic").build(None, 4, 3).state_dict()
    setup = trial_setup_for("resnet20", "synthetic", 4, 3, synthetic=dict(SYN, n_train=96),
                            trial=TrialConfig(epochs=1, step="graph", batch_size=32),
                            sketch=SketchConfig(calibration_batches=1),
                            baseline_key="graph-step-test")
    reports = []
    with caplog.at_level(logging.WARNING, logger="sketchtune"):
        train_trial([0.5] * 9, setup, baseline, lambda m, f: reports.append(m))
    assert reports and not reports[-1]["failed"] and reports[-1]["epoch"] == 1
    assert any("graph step asked for, but it needs a CUDA device" in r.getMessage()
               for r in caplog.records)
