"""The CUDA paths give what the CPU paths give. Skipped on a machine without a CUDA GPU.

Every function here runs the same work on the CPU and on the GPU and compares: the
Frequent Directions sketch, each sketch mode on a CIFAR ResNet, BN recalibration, the
bf16-autocast training loop on digits, the graph training step (against the eager CUDA
step and the CPU), and ``launch.py pretrain`` / ``sketch`` on
``--gpus 0`` end to end, with checkpoints written from the GPU read back on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from sketch_core.io.checkpoint import load_checkpoint
from sketch_core.pruning.bn import recalibrate_bn
from conftest import sketch_at
from sketch_core.registry import resolve_arch
from sketch_core.data.sets import load_data
from sketch_core.pruning.fd import frequent_directions, row_space_energy
from sketch_core.training.loop import evaluate, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda", 0)


def _model(cfg="resnet56", seed=0):
    torch.manual_seed(seed)
    model = resolve_arch(cfg, "cifar10").build().eval()
    for m in model.modules():  # non-trivial BN so that selection and refits see real scales
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_frequent_directions_on_cuda_matches_the_cpu():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 144, generator=gen) @ torch.randn(144, 144, generator=gen)
    cpu = frequent_directions(a, 20)
    gpu = frequent_directions(a.to(CUDA), 20)
    assert gpu.device.type == "cuda" and gpu.dtype == a.dtype
    # rows are unique up to sign (and rotation within equal values): compare B^T B
    ref = cpu.T @ cpu
    assert torch.allclose((gpu.T @ gpu).cpu(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    e_cpu = row_space_energy(a, cpu)
    e_gpu = row_space_energy(a.to(CUDA), gpu).cpu()
    assert torch.allclose(e_gpu, e_cpu, rtol=1e-4)


@pytest.mark.parametrize("mode", ["sketch", "select"])
def test_sketch_modes_on_cuda_match_the_cpu(mode):
    model = _model()
    rates = [0.5] * 27
    cpu = sketch_at(model, "resnet56", rates, mode=mode)
    gpu = sketch_at(model.to(CUDA), "resnet56", rates, mode=mode)
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert gpu.sketch_widths == cpu.sketch_widths
    a, b = cpu.state_dict(), gpu.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if mode == "select":  # the same filters kept: identical slices
            assert torch.equal(a[k], b[k].cpu()), k
        elif a[k].dim() == 4:  # sketched rows are unique up to sign: compare Gram matrices
            dim = 1 if k.endswith("conv2.weight") else 0  # conv2: its input channels sketched
            x = a[k].transpose(0, dim).flatten(1)
            y = b[k].cpu().transpose(0, dim).flatten(1)
            assert torch.allclose(x.T @ x, y.T @ y, atol=1e-4), k


def test_select_lsq_and_bn_recalibration_on_cuda_match_the_cpu():
    model = _model("resnet20")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 3, 32, 32, generator=gen), torch.zeros(64, dtype=torch.long))
               for _ in range(4)]
    rates = [0.4] * 9
    cpu = sketch_at(model, "resnet20", rates, mode="select_lsq", batches=batches)
    gpu = sketch_at(model.to(CUDA), "resnet20", rates, mode="select_lsq", batches=batches)
    recalibrate_bn(cpu, batches)
    recalibrate_bn(gpu, batches)
    assert all(t.device.type == "cuda" for t in gpu.state_dict().values())
    x = batches[0][0]
    with torch.no_grad():
        ref = cpu.eval()(x)
        got = gpu.eval()(x.to(CUDA)).cpu()
    assert torch.linalg.norm(got - ref) / torch.linalg.norm(ref) < 1e-3


def test_fit_on_cuda_with_bf16_autocast_learns_digits():
    data = load_data("digits", batch_size=64, device=CUDA)
    torch.manual_seed(0)
    model = resolve_arch("resnet20", "digits").build(num_classes=10, in_channels=1)
    chance = evaluate(model.to(CUDA), data.val)["acc"]
    result = fit(model, data, epochs=4, lr=0.1, lr_decay_step=[3], device=CUDA, progress=False)
    assert next(model.parameters()).device.type == "cuda"
    assert all(torch.isfinite(v).all() for v in result.best_state.values())
    assert result.best_val_acc > max(0.8, chance + 0.5)


def test_launch_pretrain_and_sketch_on_gpu0(tmp_path, capsys):
    import launch

    pre = tmp_path / "pre"
    assert launch.main(["pretrain", "--data_set", "digits", "--arch", "resnet", "--cfg", "resnet20",
                        "--num_epochs", "4", "--gpus", "0", "--job_dir", str(pre),
                        "--no_progress"]) == 0
    base = pre / "checkpoint" / "model_best.pt"
    job = tmp_path / "sk"
    assert launch.main(["sketch", "--data_set", "digits", "--arch", "resnet", "--cfg", "resnet20",
                        "--sketch_model", str(base), "--sketch_rate", "[0.5]*9",
                        "--sketch_mode", "select_lsq", "--num_epochs", "2", "--gpus", "0",
                        "--job_dir", str(job), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "running on the CPU" not in out and "on digits (cuda" in out
    loaded = load_checkpoint(job / "checkpoint" / "model_best.pt")  # written from the GPU
    assert all(t.device.type == "cpu" for t in loaded.model.state_dict().values())
    assert loaded.meta["widths"] == [8] * 3 + [16] * 3 + [32] * 3
    data = load_data("digits")
    assert evaluate(loaded.model, data.test)["acc"] > 0.8


def _graph_run(model, device, step, amp=False, batch_size=64):
    from types import SimpleNamespace

    from sketch_core.options import Recipe
    from sketch_core.training.loop import Run

    data = SimpleNamespace(train=SimpleNamespace(batch_size=batch_size))
    return Run(model, data, Recipe(epochs=1, lr=0.05, amp=amp, step=step), torch.device(device))


def _train_steps(run, batches, decay_at=None):
    for i, (x, y) in enumerate(batches):
        if i == decay_at:  # the schedule changes the rate mid-run: the graph must follow
            run.optimizer.param_groups[0]["lr"] *= 0.1
        x = x.to(run.device).contiguous(memory_format=torch.channels_last)
        run.step(x, y.to(run.device))
    return {k: v.detach().float().cpu() for k, v in run.raw.state_dict().items()}


def test_graph_step_on_cuda_trains_as_the_eager_cuda_step_and_the_cpu():
    from sketch_core.training.cuda_graph import GraphStep

    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen))
               for _ in range(10)] + [(torch.randn(40, 3, 32, 32, generator=gen),
                                       torch.randint(0, 10, (40,), generator=gen))]
    start = {k: v.float() for k, v in _model("resnet20").train().state_dict().items()}
    runs = {"cpu": _graph_run(_model("resnet20").train(), "cpu", "eager"),
            "eager": _graph_run(_model("resnet20").train(), CUDA, "eager"),
            "graph": _graph_run(_model("resnet20").train(), CUDA, "graph")}
    out = {name: _train_steps(run, batches, decay_at=7) for name, run in runs.items()}
    step = runs["graph"].step
    assert isinstance(step, GraphStep) and step.fallback is None, step.fallback
    assert step.replays == 10 - 3  # 3 warm-up batches, 7 replayed, the partial one eager
    assert step.capture_s is not None and step.capture_s < 30

    def off(a, b):  # distance of two runs, relative to how far training moved the weights
        keys = [k for k in start if start[k].is_floating_point()]
        d = torch.stack([torch.linalg.vector_norm(a[k] - b[k]) for k in keys]).norm()
        moved = torch.stack([torch.linalg.vector_norm(b[k] - start[k]) for k in keys]).norm()
        return float(d / moved)

    assert off(out["graph"], out["eager"]) < 1e-2
    assert off(out["graph"], out["cpu"]) < 5e-2  # TF32 convolutions on the GPU
    momentum = runs["graph"].optimizer.state_dict()["state"]
    assert momentum and all(s["momentum_buffer"] is not None for s in momentum.values())


def test_fit_with_the_graph_step_on_cuda_learns_digits_as_the_eager_step(caplog):
    import logging

    data = load_data("digits", batch_size=64, device=CUDA)
    results = {}
    for step in ("eager", "graph"):
        torch.manual_seed(0)
        model = resolve_arch("resnet20", "digits").build(num_classes=10, in_channels=1)
        with caplog.at_level(logging.WARNING, logger="sketchtune"):
            results[step] = fit(model, data, epochs=4, lr=0.1, lr_decay_step=[3], device=CUDA,
                                progress=False, step=step)
    assert not [r for r in caplog.records if "graph step" in r.getMessage()]  # no fallback
    assert results["graph"].best_val_acc > 0.8
    assert abs(results["graph"].best_val_acc - results["eager"].best_val_acc) < 0.05
