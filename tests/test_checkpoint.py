"""Checkpoints: the original's files, torchvision's files, sketchtune's own, bad files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import launch
from sketch_core.errors import UserError
from sketch_core.io.checkpoint import load_checkpoint, save_checkpoint
from conftest import sketch_at
from sketch_core.registry import build_model, resolve_arch

ROOT = Path(__file__).resolve().parents[1]


def _same_logits(a, b, shape=(2, 3, 32, 32)):
    x = torch.randn(*shape)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


def test_original_cifar_checkpoint_with_module_prefix(tmp_path):
    model = build_model("resnet56")
    path = tmp_path / "resnet_56.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "best_prec1": 93.26, "epoch": 150}, path)
    loaded = load_checkpoint(path, "resnet56")
    assert loaded.meta["format"] == "state_dict" and not loaded.meta["pruned"]
    assert _same_logits(loaded.model, model)


def test_pruned_original_checkpoint_widths_from_shapes(tmp_path):
    model = build_model("googlenet", rates=[0.25] * 9)
    path = tmp_path / "googlenet_pruned.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = load_checkpoint(path, "googlenet")
    assert loaded.meta["pruned"] and loaded.meta["widths"] == model.sketch_widths
    assert loaded.meta["rates"][0] == pytest.approx(0.25, abs=0.02)
    assert _same_logits(loaded.model, model)


def test_sketchtune_round_trip_and_atomic_save(tmp_path):
    model = build_model("resnet20", num_classes=10, in_channels=1, rates=[0.5] * 9)
    path = tmp_path / "ck" / "model.pt"
    save_checkpoint(path, model, cfg="resnet20", data_set="digits", rates=[0.5] * 9,
                    metrics={"test_acc": 0.97})
    assert sorted(os.listdir(path.parent)) == ["model.pt"]       # no temporary left behind
    loaded = load_checkpoint(path)
    assert loaded.meta["rates"] == [0.5] * 9 and loaded.meta["metrics"] == {"test_acc": 0.97}
    assert loaded.meta["in_channels"] == 1 and loaded.meta["widths"] == model.sketch_widths
    assert _same_logits(loaded.model, model, (2, 1, 8, 8))
    raw = torch.load(path, weights_only=True)                    # plain data only
    assert raw["format"] == "sketchtune" and raw["cfg"] == "resnet20"
    with pytest.raises(UserError, match="not a resnet56"):
        load_checkpoint(path, "resnet56")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = build_model("resnet20")
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, cfg="resnet20", metrics={"v": 1})

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, model, cfg="resnet20", metrics={"v": 2})
    monkeypatch.undo()
    assert load_checkpoint(path).meta["metrics"] == {"v": 1}
    assert os.listdir(tmp_path) == ["model.pt"]


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Evil(str(target))}, path)
    with pytest.raises(UserError, match="would run code"):
        load_checkpoint(path, "resnet20")
    assert not target.exists()


def test_truncated_missing_and_non_checkpoint_files(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, build_model("resnet20"), cfg="resnet20")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or not a checkpoint"):
        load_checkpoint(cut)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", "resnet20")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint(text, "resnet20")
    tensors = tmp_path / "list.pt"
    torch.save([1, 2, 3], tensors)
    with pytest.raises(UserError, match="no state_dict"):
        load_checkpoint(tensors, "resnet20")


def test_checkpoint_of_another_architecture_names_the_key(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save({"state_dict": build_model("resnet20").state_dict()}, path)
    with pytest.raises(UserError, match=r"missing from the file"):
        load_checkpoint(path, "resnet56")
    torch.save({"state_dict": build_model("resnet20", num_classes=10).state_dict()}, path)
    with pytest.raises(UserError, match="imagenet resnet18"):
        load_checkpoint(path, "resnet18", "imagenet")
    # same keys, other shapes
    sd = build_model("resnet20").state_dict()
    sd["layer1.0.conv2.weight"] = torch.zeros(16, 8, 3, 3)
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"layer1.0.conv2.weight has shape \(16, 8, 3, 3\) in the file"):
        load_checkpoint(path, "resnet20")


def test_torchvision_files_load(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    ours = load_checkpoint(path, "resnet18", "imagenet").model
    assert _same_logits(ours, tv, (1, 3, 64, 64))


def test_torchvision_googlenet_with_aux_heads_and_transform_input(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.googlenet(aux_logits=True, init_weights=True, transform_input=True,
                                      num_classes=4)
    path = tmp_path / "googlenet.pth"
    torch.save(tv.state_dict(), path)
    loaded = load_checkpoint(path, "googlenet", "imagenet")
    assert loaded.meta.get("transform_input") and loaded.model.transform_input
    assert _same_logits(loaded.model, tv, (1, 3, 64, 64))


def test_torchvision_densenet_legacy_keys(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(num_classes=3)
    legacy = {}
    for k, v in tv.state_dict().items():
        for a, b in (("norm1", "norm.1"), ("norm2", "norm.2"), ("conv1", "conv.1"), ("conv2", "conv.2")):
            if ".denselayer" in k:
                k = k.replace(f".{a}.", f".{b}.")
        legacy[k] = v
    assert any(".norm.1." in k for k in legacy)
    path = tmp_path / "densenet121.pth"
    torch.save(legacy, path)
    loaded = load_checkpoint(path, "densenet121", "imagenet")
    assert loaded.meta.get("legacy_keys")
    assert _same_logits(loaded.model, tv, (1, 3, 64, 64))


# --- launch.py info ----------------------------------------------------------------------

def test_info_json_and_table(capsys, tmp_path):
    assert launch.main(["info", "--arch", "resnet", "--cfg", "resnet56", "--sketch_rate", "[0.6]*27",
                        "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_rates"] == 27 and out["base_flops"] == 125485696 and out["flops"] == 73360000
    assert {"cfg", "num_rates", "flops", "params", "base_flops", "base_params"} <= set(out)
    assert launch.main(["info", "--cfg", "resnet50", "--data_set", "imagenet"]) == 0
    text = capsys.readouterr().out
    assert "4.09G" in text and "25.56M" in text and "16 sketch rates" in text
    path = tmp_path / "m.pt"
    model = sketch_at(resolve_arch("resnet20").build(), "resnet20", "[0.5]*9", mode="select")
    save_checkpoint(path, model, cfg="resnet20", rates=[0.5] * 9)
    assert launch.main(["info", "--sketch_model", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"]["loaded"] == "strict" and out["checkpoint"]["pruned"]
    assert out["rates"] == [0.5] * 9 and out["flops"] < out["base_flops"]


@pytest.mark.parametrize("args,msg", [
    (["--cfg", "resnet57"], "6n+2"),
    (["--cfg", "mobilenet"], "valid: vgg16, resnet20"),
    (["--cfg", "resnet56", "--sketch_rate", "[0.6]*26"], "takes 27 sketch rates, got 26"),
    (["--cfg", "resnet56", "--sketch_rate", "[0.6]*26+[nan]"], "(0, 1]"),
    (["--cfg", "resnet56", "--sketch_rate", "[x]*27"], "cannot parse"),
    (["--cfg", "resnet56", "--arch", "vgg"], "belongs to --arch resnet"),
    (["--cfg", "resnet56", "--start_conv", "3"], "only applies to VGG"),
    (["--sketch_model", "/nonexistent/ckpt.pt", "--cfg", "resnet56"], "does not exist"),
])
def test_info_bad_input_one_line_exit_2(capsys, args, msg):
    assert launch.main(["info", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0]


def test_info_bad_input_no_traceback_in_a_real_process(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil(str(tmp_path / "pwned"))}, path)
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "info", "--cfg", "resnet56",
                           "--sketch_model", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "would run code" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("cfg", ["resnet20", "resnet32"])
def test_classifier_named_linear_is_read_as_the_head(tmp_path, cfg, caplog):
    """The layout of the public CIFAR ResNets: module. prefix, head 'linear', no BN counters."""
    model = build_model(cfg)
    state = {f"module.{k.replace('fc.', 'linear.')}": v for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"{cfg}.th"
    torch.save({"best_prec1": 91.7, "state_dict": state}, path)
    with caplog.at_level("INFO", logger="sketchtune.checkpoint"):
        loaded = load_checkpoint(path, cfg)
    assert "head 'linear' read as 'fc'" in caplog.text
    assert loaded.meta["head_renamed"] == ["linear", "fc"] and not loaded.meta["pruned"]
    assert loaded.meta["messages"] == ["head 'linear' read as 'fc'"]
    assert _same_logits(loaded.model, model)
    # strict otherwise: a head under two names at once is not guessed at
    state["module.classifier.weight"] = state["module.linear.weight"]
    state["module.classifier.bias"] = state["module.linear.bias"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(UserError, match="key fc.weight is missing"):
        load_checkpoint(path, cfg)


def test_checkpoint_of_another_depth_names_the_key_shape_and_depth(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save({"state_dict": build_model("resnet20").state_dict()}, path)
    with pytest.raises(UserError, match=r"resnet56: key layer1\.3\.conv1\.weight \(shape \(16, 16, 3, 3\) "
                                        r"unpruned\) is missing from the file \(the file holds a resnet20\)"):
        load_checkpoint(path, "resnet56")
    torch.save({"state_dict": build_model("resnet32").state_dict()}, path)
    with pytest.raises(UserError, match=r"resnet20: unexpected key layer1\.3\.conv1\.weight \(shape "
                                        r"\(16, 16, 3, 3\)\) in the file \(the file holds a resnet32\)"):
        load_checkpoint(path, "resnet20")
