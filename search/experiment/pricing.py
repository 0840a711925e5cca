"""How a search prices a vector: its rate space, the latency table, the budgets.

:func:`rate_space` is the search's :class:`~search.propose.space.RateSpace` for a config
and a baseline (exact MACs and parameters from the cost model; latency from the
experiment's table when the search uses latency); :func:`budgets` are the config's
budgets as fractions of the unpruned network.

When a search prices vectors by latency (``objectives`` names it, ``budget.latency``
is set, or the scheduler's cost is latency) it needs one latency table
(:mod:`sketch_core.cost.latency_table`) for its architecture on the deployment target:
``latency.table`` (measured there with ``launch.py info --latency --save_table``,
checked against the config's target and this torch) or, without one, a table measured
here and cached. A new experiment keeps a copy as ``latency_table.json`` beside its
manifest, so a resumed search, the analysis and the retrain price vectors exactly as
the trials were priced. No Ray here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from search.experiment.config import SearchConfig
from search.propose.space import RateSpace
from search.results.pareto import COST_COLUMNS
from sketch_core.cost.latency import check_latency_args, measure_latency
from sketch_core.cost.latency_table import cached_table, load_table, table_key
from sketch_core.errors import UserError
from sketch_core.registry import resolve_arch

LATENCY_FILE = "latency_table.json"


def saved_table(exp_dir: Path | None) -> Any | None:
    """The experiment's copy of its latency table, or None when it has none."""
    if exp_dir is None or not (Path(exp_dir) / LATENCY_FILE).is_file():
        return None
    return load_table(Path(exp_dir) / LATENCY_FILE)


def rate_space(config: SearchConfig, baseline: dict, exp_dir: Path | None = None) -> RateSpace:
    """The search's :class:`~search.propose.space.RateSpace`; with ``exp_dir``, priced by the
    experiment's latency table when the search uses latency."""
    m, sp = config.model, config.space
    arch = resolve_arch(m.cfg, m.data_set, family=baseline.get("family") or m.family,
                        input_size=baseline.get("input_size") or m.data_input_size(),
                        start_conv=config.sketch.start_conv)
    table = saved_table(exp_dir) if config.uses_latency else None
    if config.uses_latency and exp_dir is not None and table is None:
        raise UserError(f"{exp_dir} holds no latency table, which its config needs; start "
                        f"the search again in a new folder")
    return RateSpace(latency=table, cfg=arch, data_set=m.data_set, low=sp.low, high=sp.high,
                     step=sp.step, grouping=sp.grouping, round_to=sp.round_to,
                     start_conv=config.sketch.start_conv,
                     sketch_lastconv=config.sketch.sketch_lastconv,
                     num_classes=baseline["num_classes"], in_channels=baseline["in_channels"],
                     input_size=baseline["input_size"])


__all__ = ["LATENCY_FILE", "target_key", "search_table", "saved_table", "budgets",
           "latency_summary", "cost_key", "budget_words", "measure_pick",
           "check_given_table"]


def target_key(config: SearchConfig, space: Any) -> dict:
    """The key a table for this search must have (:func:`sketch_core.cost.latency_table.table_key`)."""
    lc = config.latency
    return table_key(space.arch, device=lc.device, runtime=lc.runtime, batch=lc.batch,
                     threads=lc.threads, num_classes=space.num_classes,
                     in_channels=space.in_channels)


def search_table(config: SearchConfig, space: Any, exp_dir: Path,
                 say: Any = print) -> Any | None:
    """The table of a new experiment (None when nothing in the config needs latency):
    ``latency.table`` checked against the target, else measured here (cached); a copy
    is written to ``exp_dir/latency_table.json``."""
    if not config.uses_latency:
        return None

    lc = config.latency
    want = target_key(config, space)
    if lc.table:
        table = load_table(Path(lc.table).expanduser(), want)
        say(f"[latency] table {lc.table}: {table.key['device']}/{table.key['runtime']}, "
            f"batch {table.key['batch']}, unpruned {table.full_ms:.3f} ms")
    else:
        check_latency_args(lc.device, lc.runtime, lc.batch, lc.threads)
        say(f"[latency] latency table of {space.arch.cfg} on {lc.device}/{lc.runtime} "
            f"(batch {lc.batch}, {lc.threads or 'all'} thread(s)): measured here once per "
            f"target, then cached; on a busy machine give latency.table instead")
        table = cached_table(space.arch, lc.cache_dir, device=lc.device, runtime=lc.runtime,
                             batch=lc.batch, threads=lc.threads, num_classes=space.num_classes,
                             in_channels=space.in_channels, points=lc.points)
        say(f"[latency] unpruned {table.full_ms:.3f} ms")
    table.save(exp_dir / LATENCY_FILE)
    return table


def check_given_table(config: SearchConfig) -> None:
    """Before anything starts (no data, no Ray): a ``latency.table`` that is missing,
    not a table, measured for another target (device, runtime, batch, threads, torch,
    model) or too slow for ``budget.latency`` at every rate of the space is a UserError.
    The model fields the data decides (classes, channels) are checked again later."""
    lc = config.latency
    if not config.uses_latency or not lc.table:
        return

    table = load_table(Path(lc.table).expanduser())
    key = table.key
    shape = key.get("input_shape") or [None]
    space = rate_space(config, {"num_classes": key.get("num_classes"),
                                "in_channels": key.get("in_channels"), "input_size": shape[-1]})
    want = target_key(config, space)
    want = {k: want[k] for k in ("device", "runtime", "batch", "threads", "torch", "family",
                                 "cfg", "start_conv")}
    table.check(want, f"latency table {lc.table}")
    space.use_latency(table)
    space.check_budget(budgets(config, space))


def budgets(config: SearchConfig, space: Any) -> dict[str, float] | None:
    """The budgets as ``{cost key: fraction of the unpruned}`` (None: no budget).

    A budget in MACs is divided by the unpruned network's MACs, one in milliseconds by
    the latency table's prediction for the unpruned network."""
    flops, latency = config.budget.flops_bound(), config.budget.latency_bound()
    out: dict[str, float] = {}
    if flops is not None:
        out["flops_ratio"] = flops.ratio(space.cost_model.full_flops)
    if latency is not None:
        if space.latency is None:
            raise UserError("budget.latency needs a latency table; none was measured or given")
        out["latency_ratio"] = latency.ratio(space.full_latency_ms)
    return out or None


def budget_words(config: SearchConfig) -> str:
    """``, FLOPs <= 0.5, latency <= 3ms, objectives val_acc/latency`` (what differs from
    the defaults), for the line that starts a search."""
    b, out = config.budget, ""
    if b.flops_budget is not None:
        out += f", FLOPs <= {b.flops_bound().text}"
    if b.latency is not None:
        out += f", latency <= {b.latency_bound().text}"
    if config.objectives != ["val_acc", "flops"]:
        out += f", objectives {'/'.join(config.objectives)}"
    return out


def cost_key(config: SearchConfig) -> str:
    """The cost axis of the front as a ratio column: ``flops_ratio`` or ``latency_ratio``."""
    return COST_COLUMNS[config.cost_axis][0]


def latency_summary(space: Any, config: SearchConfig) -> dict | None:
    """What the manifest records of the latency table and budget."""
    if space.latency is None:
        return None
    key = space.latency.key
    return {"file": LATENCY_FILE, "source": config.latency.table or "measured here",
            "device": key.get("device"), "runtime": key.get("runtime"),
            "batch": key.get("batch"), "threads": key.get("threads"),
            "torch": key.get("torch"), "full_ms": space.full_latency_ms,
            "measured_full_ms": space.latency.full_ms, "budget": config.budget.latency}


def measure_pick(exp_dir: Path, config: SearchConfig, baseline: dict, widths: list[int],
                 predicted_ms: float | None, repeats: int = 30) -> dict | None:
    """The retrained pick's latency measured here on the table's target (device, runtime,
    batch, threads) beside its prediction; None when the search had no latency table.
    A network of the pick's widths is timed (latency does not depend on the weights)."""
    table = saved_table(exp_dir) if config.uses_latency else None
    if table is None or not widths:
        return None


    key = table.key
    out = {"predicted_ms": predicted_ms, "measured_ms": None, "device": key["device"],
           "runtime": key["runtime"], "batch": key["batch"], "threads": key["threads"]}
    if key["device"] == "cuda" and not torch.cuda.is_available():
        out["note"] = "the table is of a CUDA device and this machine has none: not measured"
        return out

    space = rate_space(config, baseline)
    model = space.arch.build(list(widths), key["num_classes"], key["in_channels"])
    stats = measure_latency(model, tuple(key["input_shape"]), device=key["device"],
                            runtime=key["runtime"], batch=key["batch"], threads=key["threads"],
                            repeats=repeats)
    stat = table.settings.get("stat", "median")  # the statistic the table predicts
    out.update(measured_ms=getattr(stats, f"{stat}_ms"), statistic=stat,
               measured_median_ms=stats.median_ms, measured_p10_ms=stats.p10_ms,
               measured_p90_ms=stats.p90_ms, repeats=repeats)
    return out
