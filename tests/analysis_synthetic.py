"""Synthetic experiment folders, laid out as `launch.py search` writes them, for analysis tests.

Accuracy follows a known model: each unit i costs ``sens[i] * (1 - rate_i) ** 2`` of
accuracy, so the layer sensitivity analysis has a known answer; FLOPs are a weighted
mean of the rates, so the front is a real trade-off.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["write_experiment", "BASE_FLOPS", "BASE_PARAMS"]

BASE_FLOPS = 125_485_706
BASE_PARAMS = 853_018


def write_experiment(folder: Path, n_trials: int = 60, n_units: int = 9, seed: int = 0, *,
                     sens: list[float] | None = None, running: int = 0, retrain: bool = True,
                     name: str | None = None, statuses: bool = True, manifest: bool = True) -> dict:
    """Write manifest.json, trials.jsonl, optional Ray-style running trial folders and a retrain.

    Returns a dict with the records written and the model's parameters.
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sens = list(sens) if sens is not None else list(np.linspace(0.0, 0.2, n_units))
    share = rng.uniform(0.5, 1.5, n_units)
    share /= share.sum()
    rates = np.round(rng.uniform(0.2, 1.0, (n_trials, n_units)), 2)
    rates[0] = 0.6  # the paper's uniform vector is enqueued first
    if n_trials > 1:
        rates[1] = 0.4
    flops_ratio = 0.1 + 0.9 * rates @ share
    acc = 0.93 - ((1.0 - rates) ** 2) @ np.asarray(sens) + rng.normal(0, 0.002, n_trials)
    status = np.array(["completed"] * n_trials, dtype=object)
    if statuses and n_trials >= 10:
        status[2:] = rng.choice(["completed", "stopped", "failed", "rejected"], n_trials - 2,
                                p=[0.7, 0.15, 0.05, 0.1])
    records = []
    t0 = 1.7e9
    for i in range(n_trials):
        s = status[i]
        flops = int(round(flops_ratio[i] * BASE_FLOPS))
        params = int(round((0.05 + 0.95 * rates[i].mean()) * BASE_PARAMS))
        rec = {
            "trial_id": f"{seed:04x}_{i:05d}", "status": s, "rates": [float(r) for r in rates[i]],
            "widths": [max(1, int(r * 16)) for r in rates[i]],
            "val_acc": None if s in ("failed", "rejected") else float(acc[i] - (0.05 if s == "stopped" else 0)),
            "flops": flops, "flops_ratio": flops / BASE_FLOPS, "params": params,
            "params_ratio": params / BASE_PARAMS, "epochs": {"completed": 4, "stopped": 1}.get(s, 0),
            "time_s": float(rng.uniform(5, 50)), "node": f"node{i % 3}",
            "error": "RuntimeError: CUDA out of memory" if s == "failed" else None,
            "started": t0 + i * 10.0, "ended": t0 + i * 10.0 + 9.5,
        }
        if i == 1:
            rec["paper_rates"] = f"[0.4]*{n_units}"  # the searcher labels the vectors it enqueued
        records.append(rec)
    if manifest:
        man = {
            "name": name or folder.name, "command": "launch.py search --config quickstart",
            "config": {"search": {"num_samples": n_trials}}, "cfg": "resnet56", "data_set": "cifar10",
            "family": "cifar", "num_units": n_units,
            "unit_names": [f"layer{1 + i // 3}.{i % 3}" for i in range(n_units)],
            "baseline": {"flops": BASE_FLOPS, "params": BASE_PARAMS, "val_acc": 0.935, "test_acc": 0.9326},
            "paper_rates": {f"[0.6]*{n_units}": [0.6] * n_units},
            "started": t0, "ended": t0 + n_trials * 10.0, "versions": {}, "git_commit": None, "seeds": [seed],
        }
        (folder / "manifest.json").write_text(json.dumps(man, indent=1))
    with open(folder / "trials.jsonl", "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    running_ids = []
    for k in range(running):
        tid = f"run{seed:02d}_{k:05d}"
        running_ids.append(tid)
        d = folder / f"trainable_{tid}_rates=..._2024"
        d.mkdir()
        r = [float(x) for x in np.round(rng.uniform(0.3, 1.0, n_units), 2)]
        lines = [json.dumps({"val_acc": 0.5 + 0.1 * e, "flops": 60_000_000, "flops_ratio": 0.478,
                             "params": 400_000, "epoch": e, "trial_id": tid, "time_total_s": 3.0 * e,
                             "timestamp": t0 + e, "node_ip": "127.0.0.1", "config": {"rates": r}})
                 for e in (1, 2)]
        (d / "result.json").write_text("\n".join(lines) + "\n" + '{"val_acc": 0.7, "epo')  # half-written
    best = None
    if retrain:
        done = [r for r in records if r["status"] == "completed"]
        best = max(done, key=lambda r: r["val_acc"])
        out = folder / "retrain" / "best"
        out.mkdir(parents=True)
        (out / "result.json").write_text(json.dumps({
            "trial_id": best["trial_id"], "pick": "best", "rates": best["rates"], "widths": best["widths"],
            "test_acc": 0.9211, "val_acc": 0.925, "flops": best["flops"], "params": best["params"],
            "flops_ratio": best["flops_ratio"], "params_ratio": best["params_ratio"]}))
    return {"records": records, "sens": sens, "share": share, "running_ids": running_ids, "best": best}
