"""``launch.py search`` and ``launch.py retrain``: the command lines of the rate search.

``search --config FILE|NAME`` runs a search (see :mod:`search.run.ray_driver`) with the
overrides ``--budget``, ``--num_samples``, ``--flops_budget``, ``--address``,
``--name``, ``--storage_path``, ``--study_storage``, ``--resume`` and any
``--set section.key=value``; it ends by printing the Pareto front and where the
experiment folder, the dataframe and the final model are. ``retrain --experiment DIR
--pick knee|best|flops<=F|latency<=L|trial=ID [--workers N]`` retrains one configuration of a
finished search (see :mod:`search.run.retrain`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from sketch_core.errors import UserError
from search.results.pareto import COST_COLUMNS
from search.results.dataframe import export, load_results
from search.results.picks import front_cost, knee_record, pareto_records

__all__ = ["add_arguments", "run", "print_front"]


def add_arguments(parser: argparse.ArgumentParser, command: str = "search") -> None:
    a = parser.add_argument
    if command == "retrain":
        a("--experiment", required=True, help="the experiment folder a search wrote")
        a("--pick", default="knee",
          help="which configuration: knee (default), best, 'flops<=F' (F a fraction of the "
               "unpruned FLOPs), 'latency<=L' (L a fraction of the unpruned predicted "
               "latency, or milliseconds like 3ms; quote both) or trial=ID")
        a("--workers", type=int, default=None,
          help="data-parallel workers (Ray Train TorchTrainer); default: the config's "
               "retrain.workers")
        a("--epochs", type=int, default=None, help="override retrain.epochs of the config")
        a("--address", default=None,
          help="Ray cluster for --workers > 1 (auto, host:port); default: a local instance")
        a("--quiet", action="store_true", help="print only the result")
        _normalize_arguments(parser, "the baseline's recorded one")
        a("--export", default=None,
          help="also export the retrained model (onnx or pt2) beside its model.pt")
        parser.set_defaults(command_name="retrain")
        return
    a("--config", default=None,
      help="a YAML file, or the name of a shipped config (quickstart, cifar10_resnet56, ...); "
           "not needed with --resume (the experiment keeps its config)")
    a("--budget", default=None, help="wall-clock budget of the search phase: 90s, 30m, 4h")
    a("--num_samples", type=int, default=None, help="number of trials")
    a("--flops_budget", default=None,
      help="keep at most this much of the unpruned FLOPs: a fraction (0-1], a percentage "
           "('50%%') or MACs ('60M'); nothing above is trained")
    a("--address", default=None,
      help="Ray cluster to use: auto, host:port or ray://host:port; default: start a local "
           "instance on 127.0.0.1")
    a("--name", default=None, help="experiment name (folder under --storage_path)")
    a("--storage_path", default=None,
      help="where experiments live: a local or shared folder, or a URI Ray accepts")
    a("--study_storage", default=None,
      help="Optuna storage URL (e.g. postgresql://...); default: SQLite in the experiment")
    a("--resume", action="store_true",
      help="continue the experiment that --name and --storage_path point at")
    a("--cfg", default=None, help="override model.cfg (e.g. another ImageNet ResNet)")
    a("--data_path", default=None, help="override model.data_path")
    a("--pretrained", default=None, help="override model.pretrained (a checkpoint)")
    a("--family", default=None, help="override model.family (cifar or imagenet)")
    _normalize_arguments(parser, "model.normalize, else model.pretrained's record, else the "
                                 "data set's own")
    a("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
      help="override any config value, e.g. --set trial.epochs=5 (repeatable)")
    a("--no_retrain", action="store_true", help="skip the final retrain the config asks for")
    a("--quiet", action="store_true", help="print only the final summary")
    parser.set_defaults(command_name="search")


def _normalize_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--normalize", default=None, metavar="cifar|imagenet|MEAN/STD",
                        help=f"input normalisation, e.g. 0.5,0.5,0.5/0.25,0.25,0.25; default: "
                             f"{default}")
    parser.add_argument("--force_normalize", action="store_true",
                        help="use --normalize even where it contradicts the checkpoint's record")


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides or [])
    if getattr(args, "force_normalize", False):
        out.append("model.force_normalize=true")
    for flag, key in (("budget", "budget.time"), ("num_samples", "budget.num_samples"),
                      ("flops_budget", "budget.flops_budget"), ("name", "storage.name"),
                      ("storage_path", "storage.storage_path"),
                      ("study_storage", "storage.study_storage"), ("cfg", "model.cfg"),
                      ("data_path", "model.data_path"), ("pretrained", "model.pretrained"),
                      ("family", "model.family"), ("normalize", "model.normalize")):
        value = getattr(args, flag, None)
        if value is not None:  # a budget is read as YAML: 0.5 is a number, 60M a string
            out.append(f"{key}={value if flag == 'flops_budget' else _yaml_str(value)}")
    return out


def _yaml_str(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"  # a YAML string, whatever it looks like
    return str(value)


def _fmt_rates(rates: list[float] | None) -> str:
    from sketch_core.rates import format_rates  # heavy: torch

    return format_rates(rates) if rates else "-"


def print_front(records: list[dict], limit: int = 20, file=None, cost: str = "flops_ratio") -> None:
    """The Pareto front (completed trials) as a table, cheapest first (``cost``: the
    search's cost axis, ``flops_ratio`` or ``latency_ratio``)."""
    file = file or sys.stdout
    cost = front_cost(records, cost)
    front = pareto_records(records, cost)
    knee = knee_record(records, cost)
    if not front:
        print("no trial completed its schedule: no Pareto front", file=file)
        return
    lat = any(r.get("latency_ms") is not None for r in front)
    print(f"Pareto front ({len(front)} of {sum(r.get('status') == 'completed' for r in records)} "
          f"completed trials{', by predicted latency' if cost == 'latency_ratio' else ''}; "
          f"* = knee):", file=file)
    print(f"  {'trial':<16} {'val acc':>8} {'FLOPs':>7} {'params':>7}"
          f"{' latency (pred.)' if lat else ''}  rates", file=file)
    shown = front if len(front) <= limit else front[:limit // 2] + front[-limit // 2:]
    for r in shown:
        mark = "*" if knee is not None and r.get("trial_id") == knee.get("trial_id") else " "
        ms = r.get("latency_ms")
        lat_text = (f" {ms:10.3f} ms" if ms is not None else f" {'-':>13}") if lat else ""
        print(f"{mark} {str(r['trial_id']):<16} {100 * r['val_acc']:7.2f}% "
              f"{100 * r['flops_ratio']:6.1f}% {100 * (r.get('params_ratio') or 0):6.1f}%"
              f"{lat_text}  {_fmt_rates(r.get('rates'))}", file=file)
    if len(front) > limit:
        print(f"  ... {len(front) - limit} more in trials.jsonl", file=file)


def _export_dataframe(exp_dir: Path) -> Path | None:
    try:
        return export(load_results(exp_dir), exp_dir, "csv", "trials")
    except Exception as exc:  # the search's results stand without the export
        logging.getLogger("sketchtune.search").warning("dataframe export failed: %s", exc)
        return None


def _run_search(args: argparse.Namespace) -> int:
    from search.experiment.config import load_config  # heavy: torch; the CLI's --help stays light
    from search.experiment.scoring_split import describe  # heavy: torch
    from search.run.ray_driver import run_search  # heavy: ray

    if args.config:
        config = load_config(args.config, _overrides(args))
    elif args.resume:  # only where the experiment is matters: it keeps its own config
        from search.experiment.config import apply_overrides, config_from_dict  # heavy: torch

        config = config_from_dict(apply_overrides({}, _overrides(args)))
    else:
        raise UserError("--config is required: a YAML file or a shipped config's name "
                        "(quickstart, cifar10_resnet56, ...)")
    command = "launch.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    outcome = run_search(config, address=args.address, resume=args.resume, command=command,
                         quiet=args.quiet, run_retrain=False if args.no_retrain else None)
    from search.experiment.folder import read_manifest  # heavy: torch

    axis = read_manifest(outcome.exp_dir).get("cost_axis") or "flops"
    print()
    print_front(outcome.records, cost=COST_COLUMNS.get(axis, COST_COLUMNS["flops"])[0])
    df_path = _export_dataframe(outcome.exp_dir)
    print(f"scores:            {describe((outcome.baseline or {}).get('scores'))}")
    print(f"experiment folder: {outcome.exp_dir}")
    print(f"dataframe:         {df_path or outcome.exp_dir / 'trials.jsonl'}  "
          f"(python launch.py analyze {outcome.exp_dir})")
    if outcome.retrain:
        n = outcome.retrain.get("test_images")
        print(f"final model:       {outcome.retrain['model']}  (test acc "
              f"{100 * outcome.retrain['test_acc']:.2f}%{f' on {n} test images' if n else ''}, FLOPs "
              f"-{100 * outcome.retrain['flops_reduction']:.1f}%"
              f"{_latency_words(outcome.retrain.get('latency'))})")
    p = outcome.phases
    print("phases: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in p.items() if v is not None))
    return 0


def _latency_words(lat: dict | None) -> str:
    """``, latency 0.85 ms measured (1.05 predicted)`` for a pick priced by latency."""
    if not lat or lat.get("predicted_ms") is None:
        return ""
    if lat.get("measured_ms") is None:
        return f", latency {lat['predicted_ms']:.3f} ms predicted"
    return (f", latency {lat['measured_ms']:.3f} ms measured ({lat['predicted_ms']:.3f} "
            f"predicted)")


def _run_retrain(args: argparse.Namespace) -> int:
    from search.run.retrain import retrain_experiment  # heavy: ray, torch

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    retrain_experiment(args.experiment, args.pick, workers=args.workers, epochs=args.epochs,
                       quiet=args.quiet, address=args.address, normalize=args.normalize,
                       force_normalize=args.force_normalize, export=args.export)
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "command_name", "search") == "retrain":
        return _run_retrain(args)
    return _run_search(args)
