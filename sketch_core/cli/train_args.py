"""``launch.py sketch`` and ``launch.py pretrain``: the original's single-shot command line.

``sketch`` loads ``--sketch_model``, sketches it at ``--sketch_rate``, recalibrates BN
and fine-tunes; ``pretrain`` trains an unpruned baseline that ``sketch`` accepts. Both
keep ``checkpoint/model_last.pt`` and ``checkpoint/model_best.pt`` (best on the
validation split; sketchtune checkpoints) and ``checkpoint/train_state.pt`` (what
``--resume`` continues from), ``metrics.csv``, ``logger.log`` and ``result.json`` in
``--job_dir``. Every argument of the original keeps its name, meaning and default;
booleans take the original's spelling (``--filter_norm True``).

This module runs one process on one device. ``search.cli.train_runs`` sends runs on
several GPUs to ``search.distributed`` (Ray Train), which calls :func:`execute` in
each worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import UserError

__all__ = ["add_arguments", "run", "execute", "prepare_job_dir", "select_devices",
           "check_args", "preflight", "str2bool", "PRETRAIN_DEFAULTS", "JOB_FILES"]

log = logging.getLogger("sketchtune")

# what a run writes into --job_dir (and what --reset removes; nothing else is touched)
JOB_FILES = ("checkpoint", "metrics.csv", "logger.log", "result.json", "tensorboard", "ray")
STATE_FILE = "train_state.pt"
# what makes a job folder hold a run (a failed start leaves none of these)
RUN_MARKERS = ("checkpoint/" + STATE_FILE, "checkpoint/model_last.pt", "checkpoint/model_best.pt",
               "metrics.csv", "result.json")
# pretrain defaults per data set (sketch keeps the original's 150 epochs at lr 0.01)
PRETRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"num_epochs": 40, "lr": 0.1, "lr_decay_step": [20, 30]},
    "synthetic": {"num_epochs": 30, "lr": 0.1, "lr_decay_step": [15, 25]},
    "default": {"num_epochs": 200, "lr": 0.1, "lr_decay_step": [100, 150]},
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SKETCH_DEFAULTS = {"num_epochs": 150, "lr": 0.01, "lr_decay_step": [50, 100]}
# options that define a run: a --resume with other values would be another run
_RUN_KEYS = ("command", "data_set", "arch", "cfg", "num_classes", "in_channels",
             "train_batch_size", "momentum", "lr", "lr_decay_step", "weight_decay",
             "label_smoothing", "seed", "val_fraction")


def str2bool(text: str | bool) -> bool:
    """The original's boolean spelling: ``True``/``False`` (also yes/no, 1/0)."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("true", "yes", "1", "y", "t"):
        return True
    if value in ("false", "no", "0", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _bool_option(parser: argparse.ArgumentParser, name: str, default: bool, help_text: str) -> None:
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default,
                        metavar="True|False", help=f"{help_text} default:{default}")


def add_arguments(parser: argparse.ArgumentParser, command: str = "sketch") -> None:
    """Every option of the original's ``sketch.py`` (same names and defaults), plus a few."""
    pre = command == "pretrain"
    a = parser.add_argument
    a("--gpus", type=int, nargs="+", default=None,
      help="Select gpu_id to use; several ids train data-parallel. default:[0] "
           "(the CPU when the machine has no GPU)")
    a("--data_set", default="cifar10",
      help="Select dataset to train: cifar10, imagenet, folder, digits, synthetic. "
           "default:cifar10")
    a("--data_path", default=None,
      help="The directory where the input is stored. default:data/cifar10 for cifar10 "
           "(cifar-10-batches-py/ inside); class folders train/ and val/ for imagenet, folder")
    a("--job_dir", default="./experiments",
      help="The directory where the summaries will be stored. default:./experiments")
    a("--reset", action="store_true", help="Reset the directory? (removes this tool's files there)")
    a("--resume", default=None,
      help="Continue an interrupted run from its checkpoint (JOB_DIR/checkpoint/train_state.pt, "
           "model_last.pt beside it, or the job folder).")
    if not pre:
        a("--refine", default=None,
          help="Path to an already sketched sketchtune checkpoint to be fine tuned.")
    a("--arch", default=None,
      help="Architecture of model. default:" + (
          "vgg" if pre else "the checkpoint's (sketchtune files describe themselves)"))
    a("--cfg", default=None,
      help="Detail architecture of model. default:" + (
          "vgg16" if pre else "the checkpoint's; original and torchvision files need it"))
    a("--num_epochs", type=int, default=None,
      help="The num of epochs to train. default:" + (
          "40 for digits, 30 for synthetic, 200 otherwise" if pre else "150"))
    a("--train_batch_size", type=int, default=128, help="Batch size for training. default:128")
    a("--eval_batch_size", type=int, default=100, help="Batch size for validation. default:100")
    a("--momentum", type=float, default=0.9, help="Momentum for MomentumOptimizer. default:0.9")
    a("--lr", type=float, default=None,
      help="Learning rate for train. default:" + ("0.1" if pre else "1e-2"))
    a("--lr_decay_step", type=int, nargs="+", default=None,
      help="The epochs at which the learning rate is multiplied by 0.1. default:" + (
          "20 30 for digits, 15 25 for synthetic, 100 150 otherwise" if pre else "50 100"))
    a("--weight_decay", type=float, default=5e-4, help="The weight decay of loss. default:5e-4")
    if not pre:
        a("--start_conv", type=int, default=1,
          help="The index of Conv to start sketch (VGG only). default:1")
        a("--sketch_rate", default=None,
          help="The rate of each sketch unit, e.g. '[0.5]*9+[0.6]*9+[0.4]*9' (quote it). "
               "default:None")
        a("--sketch_model", default=None, help="Path to the model wait for sketch. default:None")
        _bool_option(parser, "--sketch_bn", False, "Whether the BN weights are sketched or not?")
        a("--weight_norm_method", default=None,
          help="Select the weight norm method. default:None Optional:max,sum,l2,l1,l2_2,2max")
        _bool_option(parser, "--filter_norm", False, "Filter level normalization or not?")
        _bool_option(parser, "--sketch_lastconv", True, "Is the last layer of convolution sketched?")
        a("--random_rule", default="default",
          help="default sketches; random_pretrain / l1_pretrain keep random / largest-L1 "
               "pretrained filters instead. default:default")
        a("--sketch_mode", default="sketch",
          help="sketch (the original: filters replaced by their sketch), select (keep the "
               "filters with most energy in the sketch's row space) or select_lsq (select, then "
               "refit consumers by least squares). default:sketch")
        a("--select_by", default="filters",
          help="What select / select_lsq sketch to rank channels: filters (the producer's "
               "filters) or channels (each channel's weights in its consumers, scaled by the "
               "BN gain it arrives with). default:filters")
        a("--calibration_batches", type=int, default=10,
          help="Training batches used to recompute BN statistics (and for select_lsq). "
               "default:10")
    a("--test_only", action="store_true",
      help="Test only: evaluate the checkpoint given by --refine, --resume or --sketch_model "
           "and exit." if not pre else "Test only: evaluate --resume's checkpoint and exit.")
    # additions
    a("--val_fraction", type=float, default=0.1,
      help="Fraction of the training set held out (seeded) to choose the best epoch. default:0.1")
    a("--seed", type=int, default=0, help="Seed of the split, the shuffling and the init. default:0")
    a("--label_smoothing", type=float, default=0.0, help="Label smoothing. default:0")
    a("--compile", nargs="?", const=True, default=False, metavar="MODE",
      help="torch.compile the model; MODE reduce-overhead adds CUDA graphs (on an H100 it "
           "trained CIFAR ResNet-56 4.4x faster, after about 80 s of compiling)")
    a("--amp", type=str2bool, nargs="?", const=True, default=None, metavar="True|False",
      help="bf16 autocast. default: True on CUDA, False on the CPU")
    a("--download", action="store_true", help="Download CIFAR-10 into --data_path if missing.")
    a("--input_size", type=int, default=None,
      help="Image side for folder, imagenet and synthetic data. default:224 (32 synthetic)")
    a("--num_classes", type=int, default=None,
      help="Number of classes of synthetic data (checked against the data otherwise).")
    a("--num_workers", type=int, default=None,
      help="Decoding processes for class-folder data. default:min(8, CPUs)")
    a("--no_progress", action="store_true", help="No per-batch progress bar.")
    parser.set_defaults(command_name=command)


# ---------------------------------------------------------------- argument checks


def _resolve_defaults(args: argparse.Namespace) -> None:
    pre = args.command_name == "pretrain"
    table = (PRETRAIN_DEFAULTS.get(args.data_set, PRETRAIN_DEFAULTS["default"]) if pre
             else SKETCH_DEFAULTS)
    for key, value in table.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, value in (("refine", None), ("sketch_model", None), ("sketch_rate", None),
                       ("start_conv", None), ("sketch_mode", None), ("select_by", None)):
        if not hasattr(args, key):
            setattr(args, key, value)


def check_args(args: argparse.Namespace) -> None:
    """Bad numbers and combinations, before anything is loaded or written."""
    _resolve_defaults(args)
    if args.num_epochs < 0:
        raise UserError(f"--num_epochs must be >= 0, got {args.num_epochs}")
    if args.train_batch_size < 1 or args.eval_batch_size < 1:
        raise UserError(f"batch sizes must be positive, got --train_batch_size "
                        f"{args.train_batch_size} --eval_batch_size {args.eval_batch_size}")
    if list(args.lr_decay_step) != sorted(args.lr_decay_step) or min(args.lr_decay_step) < 0:
        raise UserError(f"--lr_decay_step must list epochs in increasing order, got "
                        f"{' '.join(map(str, args.lr_decay_step))}")
    if args.lr <= 0 or args.momentum < 0 or args.weight_decay < 0:
        raise UserError(f"--lr must be positive and --momentum, --weight_decay non-negative; got "
                        f"{args.lr}, {args.momentum}, {args.weight_decay}")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if getattr(args, "calibration_batches", 1) < 1:
        raise UserError(f"--calibration_batches must be >= 1, got {args.calibration_batches}")
    if args.reset and args.resume:
        raise UserError("--reset would delete what --resume continues from; use one of them")
    if args.refine and args.resume:
        raise UserError("--refine starts a new fine-tune and --resume continues one; use one")
    if args.compile not in (False, True) and args.compile not in COMPILE_MODES:
        raise UserError(f"unknown --compile mode {args.compile!r}; valid: "
                        f"{', '.join(COMPILE_MODES)}")
    if args.sketch_mode is not None:  # sketch: its choices before anything is loaded
        from ..sketching import check_options

        check_options(args.sketch_mode, args.select_by, args.random_rule, args.weight_norm_method)


def select_devices(gpus: list[int] | None) -> list[torch.device]:
    """``--gpus`` as devices: the CPU for the default (or GPU 0) on a machine without CUDA."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ids = [0] if gpus is None else list(gpus)
    if len(set(ids)) != len(ids):
        raise UserError(f"--gpus lists a GPU twice: {' '.join(map(str, ids))}")
    if count == 0:
        if ids == [0]:
            print("no CUDA device found: running on the CPU")
            return [torch.device("cpu")]
        raise UserError(f"--gpus {' '.join(map(str, ids))}: this machine has no CUDA device "
                        f"(the default --gpus 0 runs on the CPU)")
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise UserError(f"--gpus {' '.join(map(str, bad))}: no such GPU; this machine has {count} "
                        f"(ids 0..{count - 1})")
    return [torch.device("cuda", i) for i in ids]


def _state_path(resume: str) -> Path:
    """The training state ``--resume`` names: the file itself, one beside it, or the job's."""
    p = Path(resume).expanduser()
    if p.is_dir():
        cands = [p / "checkpoint" / STATE_FILE, p / STATE_FILE]
    else:
        cands = [p] if p.name == STATE_FILE else [p.parent / STATE_FILE, p]
    for cand in cands:
        if cand.is_file():
            return cand
    raise UserError(f"--resume {resume}: no training state found; expected "
                    f"JOB_DIR/checkpoint/{STATE_FILE} (or model_last.pt beside it, or JOB_DIR)")


def prepare_job_dir(args: argparse.Namespace) -> Path:
    """Refuse to overwrite an earlier run; ``--reset`` removes this tool's files first."""
    job = Path(args.job_dir).expanduser()
    if args.reset:
        for name in JOB_FILES:
            path = job / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    present = [name for name in RUN_MARKERS if (job / name).exists()]
    if present and not args.resume:
        raise UserError(f"--job_dir {job} already holds a run ({', '.join(present)}); pass "
                        f"--resume {job / 'checkpoint' / STATE_FILE} to continue it, --reset to "
                        f"start over, or another --job_dir")
    (job / "checkpoint").mkdir(parents=True, exist_ok=True)
    return job


# ---------------------------------------------------------------- running


@contextlib.contextmanager
def _logging_to(job: Path | None, enabled: bool = True) -> Iterator[None]:
    """Log lines to stdout and JOB_DIR/logger.log for the duration of a run (or nowhere)."""
    handlers: list[logging.Handler] = []
    if enabled:
        handlers.append(logging.StreamHandler(sys.stdout))
        handlers[0].setFormatter(logging.Formatter("%(message)s"))
        if job is not None:
            handlers.append(logging.FileHandler(job / "logger.log"))
            handlers[1].setFormatter(logging.Formatter("%(asctime)s %(message)s",
                                                       "%Y-%m-%d %H:%M:%S"))
    old = log.level, log.propagate
    log.setLevel(logging.INFO if enabled else logging.WARNING)
    log.propagate = False  # not twice through a root logger that a host (Ray) configured
    for h in handlers:
        log.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(old[0])
        log.propagate = old[1]


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[Callable[[], int]]:
    """SIGINT/SIGTERM set a flag that the loop polls; yields a getter of the signal number."""
    caught = {"signum": 0}
    if not enabled:
        yield lambda: 0
        return

    def handler(signum, frame):  # noqa: ARG001
        if caught["signum"]:  # a second signal: stop now
            raise KeyboardInterrupt
        caught["signum"] = signum
        print(f"\nsignal {signum} received: saving a resumable checkpoint after this batch",
              file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: caught["signum"]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _load_data(args: argparse.Namespace, device: torch.device):
    from ..data import load_data

    synthetic = {"num_classes": args.num_classes} if args.num_classes else None
    data = load_data(args.data_set, args.data_path, batch_size=args.train_batch_size,
                     eval_batch_size=args.eval_batch_size, val_fraction=args.val_fraction,
                     seed=args.seed, device=device, download=args.download,
                     input_size=args.input_size, num_workers=args.num_workers,
                     synthetic=synthetic if args.data_set == "synthetic" else None)
    if args.num_classes and args.num_classes != data.num_classes:
        raise UserError(f"--num_classes {args.num_classes} but {args.data_set} has "
                        f"{data.num_classes} classes")
    return data


def _command_line(args: argparse.Namespace) -> str:
    """The resolved options, as a command line (for the log)."""
    parts = []
    for key, value in vars(args).items():
        if key in ("command", "command_name") or value is None or value is False:
            continue
        if value is True:
            parts.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"--{key} " + " ".join(map(str, value)))
        else:
            parts.append(f"--{key} {value}")
    return " ".join(parts)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _reduction(before: int, after: int) -> str:
    return f"{100 * (1 - after / before):.2f}%" if before else "n/a"


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _check_forward(model: torch.nn.Module, data, cfg: str) -> None:
    """Fail with one clear line when the model cannot take the data's images."""
    x = torch.zeros(2, *data.shape, device=next(model.parameters()).device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        raise UserError(f"{cfg} cannot take {data.name}'s {data.input_size}x{data.input_size} "
                        f"images with {data.in_channels} channel(s) ({str(exc).splitlines()[0]}); "
                        f"choose a smaller --cfg or a larger --input_size") from None
    finally:
        model.train(was)
    if out.shape[-1] != data.num_classes:
        raise UserError(f"the model has {out.shape[-1]} outputs but {data.name} has "
                        f"{data.num_classes} classes")


def _describe(args: argparse.Namespace, data) -> dict[str, Any]:
    return {"command": args.command_name, "data_set": args.data_set, "arch": args.arch,
            "cfg": args.cfg, "num_classes": data.num_classes, "in_channels": data.in_channels,
            "input_size": data.input_size, "train_batch_size": args.train_batch_size,
            "momentum": args.momentum, "lr": args.lr, "lr_decay_step": list(args.lr_decay_step),
            "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing,
            "seed": args.seed, "val_fraction": args.val_fraction}


def _check_resume(meta: dict[str, Any], run: dict[str, Any], path: Path) -> None:
    diff = [f"{k}: {meta.get(k)!r} in the checkpoint, {run.get(k)!r} now" for k in _RUN_KEYS
            if k in run and run[k] is not None and meta.get(k) != run[k]]
    if diff:
        raise UserError(f"--resume {path} belongs to another configuration ({'; '.join(diff)}); "
                        f"resume with the run's own options, or start a new --job_dir")


def _sketch_source(args: argparse.Namespace) -> str:
    """The checkpoint a (non-resumed) sketch run starts from; a UserError when there is none."""
    source = args.refine or args.sketch_model
    if source is None:
        raise UserError("sketch needs --sketch_model (the pretrained checkpoint to sketch), or "
                        "--refine (an already sketched checkpoint to fine-tune)")
    if not Path(source).expanduser().is_file():
        raise UserError(f"checkpoint {source} does not exist")
    return source


def preflight(args: argparse.Namespace) -> None:
    """What can be checked before workers start (data-parallel runs), so that the driver
    says it in one line: the starting checkpoint and the rate count."""
    import sketch_core as sc

    check_args(args)
    if args.command_name != "sketch" or args.resume:
        return
    _sketch_source(args)
    if args.sketch_rate and args.cfg and not args.refine:
        sc.parse_rates(args.sketch_rate, args.cfg, args.data_set, args.start_conv)


def _model_for(args: argparse.Namespace, data, device: torch.device, run: dict[str, Any]
               ) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any] | None]:
    """The model to train, its description and a start state (for --resume)."""
    import sketch_core as sc
    from ..train import evaluate, load_state

    kw = dict(num_classes=data.num_classes, in_channels=data.in_channels)
    if args.resume:
        path = _state_path(args.resume)
        state = load_state(path)
        meta = state["meta"]
        for key in ("arch", "cfg"):
            if getattr(args, key) is None:
                setattr(args, key, meta.get(key))
                run[key] = meta.get(key)
        if args.sketch_rate and meta.get("rates") is not None:
            rates = sc.parse_rates(args.sketch_rate, meta["cfg"], args.data_set, args.start_conv)
            if [round(r, 6) for r in rates] != [round(r, 6) for r in meta["rates"]]:
                raise UserError(f"--resume {path} was sketched at --sketch_rate "
                                f"'{sc.format_rates(meta['rates'])}', not '{args.sketch_rate}'")
        _check_resume(meta, run, path)
        model = sc.build_model(meta["cfg"], args.data_set, widths=meta.get("widths"), **kw)
        log.info("resuming %s from %s (epoch %d, batch %d)", meta["cfg"], path,
                 state["epoch"] + 1, state["batch"])
        return model.to(device), dict(meta), state

    if args.command_name == "pretrain":
        args.arch, args.cfg = args.arch or "vgg", args.cfg or "vgg16"
        sc.get_arch(args.cfg, args.data_set, args.arch)
        model = sc.build_model(args.cfg, args.data_set, **kw).to(device)
        _check_forward(model, data, args.cfg)
        base_macs, base_params = sc.count_flops(model, data.shape)
        return model, {**run, "arch": args.arch, "cfg": args.cfg, "rates": None,
                       "widths": None, "base_flops": base_macs, "base_params": base_params}, None

    source = _sketch_source(args)
    loaded = sc.load_checkpoint(source, cfg=args.cfg, data_set=args.data_set, **kw)
    m = loaded.meta
    args.cfg = args.cfg or m["cfg"]
    args.arch = args.arch or m["arch"]
    sc.get_arch(args.cfg, args.data_set, args.arch)
    model = loaded.model.to(device)
    _check_forward(model, data, args.cfg)
    full = sc.build_model(args.cfg, args.data_set, **kw)
    base_macs, base_params = sc.count_flops(full, data.shape)
    desc = {**run, "arch": args.arch, "cfg": args.cfg, "base_flops": base_macs,
            "base_params": base_params}
    if args.refine:
        log.info("fine-tuning the sketched checkpoint %s", args.refine)
        return model, {**desc, "rates": m.get("rates"), "widths": m.get("widths"),
                       "sketch_mode": (m.get("extra") or {}).get("sketch_mode"),
                       "select_by": (m.get("extra") or {}).get("select_by")}, None

    if not args.sketch_rate:
        units = sc.get_arch(args.cfg, args.data_set).plan(args.start_conv).num_units
        raise UserError(f"--sketch_rate is required to sketch: {args.cfg} takes {units} rates, "
                        f"e.g. '[0.5]*{units}'")
    rates = sc.parse_rates(args.sketch_rate, args.cfg, args.data_set, args.start_conv)
    widths = sc.rates_to_widths(args.cfg, rates, data_set=args.data_set,
                                start_conv=args.start_conv, sketch_lastconv=args.sketch_lastconv)
    base = evaluate(model, data.val if data.val is not None else data.test, device)
    calib = data.calibration_batches(args.calibration_batches)
    lsq_log: list[str] = []
    narrow = sc.sketch(model, args.cfg, rates, args.data_set, mode=args.sketch_mode,
                       weight_norm_method=args.weight_norm_method, filter_norm=args.filter_norm,
                       sketch_bn=args.sketch_bn, sketch_lastconv=args.sketch_lastconv,
                       start_conv=args.start_conv, random_rule=args.random_rule, seed=args.seed,
                       batches=calib, widths=widths, lsq_log=lsq_log, select_by=args.select_by)
    for line in lsq_log:
        log.info("%s", line)
    sc.recalibrate_bn(narrow, calib, device)
    after = evaluate(narrow, data.val if data.val is not None else data.test, device)
    split = "val" if data.val is not None else "test"
    log.info("sketched %s at '%s' (mode %s): %s acc %s before, %s after sketch + BN "
             "recalibration", args.cfg, sc.format_rates(rates), args.sketch_mode, split,
             _pct(base["acc"]), _pct(after["acc"]))
    return narrow, {**desc, "rates": rates, "widths": widths, "sketch_mode": args.sketch_mode,
                    "select_by": args.select_by if args.sketch_mode != "sketch" else None,
                    "acc_before_sketch": base["acc"], "acc_after_sketch": after["acc"]}, None


def execute(args: argparse.Namespace, device: torch.device, *,
            report: Callable[[dict[str, Any]], None] | None = None,
            stop: Callable[[], int] | None = None, rank0: bool = True) -> dict[str, Any]:
    """One run on ``device`` (the job folder is ready): load, sketch, fine-tune, save, test.

    ``report(metrics)`` is called after every epoch (Ray Train's report in a worker).
    Returns the final result (also written to ``JOB_DIR/result.json`` by rank 0).
    """
    import sketch_core as sc
    from ..train import atomic_write_text, evaluate, fit

    job = Path(args.job_dir).expanduser()
    ckpt = job / "checkpoint"
    data = _load_data(args, device)
    run = _describe(args, data)
    torch.manual_seed(args.seed)  # the initial weights (pretrain) and any sketch randomness
    model, meta, start_state = _model_for(args, data, device, run)
    macs, params = sc.count_flops(model, data.shape)
    meta.update(flops=macs, params=params)
    base_macs, base_params = meta.get("base_flops") or macs, meta.get("base_params") or params
    log.info("model %s on %s (%s): FLOPs (MACs) %s -> %s (reduced %s), params %s -> %s "
             "(reduced %s)", meta["cfg"], data.name, device, _human(base_macs), _human(macs),
             _reduction(base_macs, macs), _human(base_params), _human(params),
             _reduction(base_params, params))
    save_kw = dict(cfg=meta["cfg"], data_set=args.data_set, num_classes=data.num_classes,
                   in_channels=data.in_channels, rates=meta.get("rates"), widths=meta.get("widths"))
    extra = {k: meta[k] for k in ("sketch_mode", "select_by", "command")
             if meta.get(k) is not None}

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        row = {k: v for k, v in metrics.items() if v is not None}
        if rank0:
            sc.save_checkpoint(ckpt / "model_last.pt", model, metrics=row, extra=extra, **save_kw)
            if metrics["is_best"]:
                sc.save_checkpoint(ckpt / "model_best.pt", model, metrics=row, extra=extra,
                                   **save_kw)
        if report is not None:
            report(row)

    result = fit(model, data, epochs=args.num_epochs, lr=args.lr, momentum=args.momentum,
                 weight_decay=args.weight_decay, lr_decay_step=args.lr_decay_step,
                 label_smoothing=args.label_smoothing, device=device, job_dir=job,
                 seed=args.seed, compile=args.compile, amp=args.amp, progress=not args.no_progress,
                 start_state=start_state, state_path=ckpt / STATE_FILE, state_meta=meta,
                 on_epoch=on_epoch, stop=stop)
    model.load_state_dict(result.best_state)
    if args.num_epochs == 0 and rank0:
        sc.save_checkpoint(ckpt / "model_best.pt", model, metrics={}, extra=extra, **save_kw)
        sc.save_checkpoint(ckpt / "model_last.pt", model, metrics={}, extra=extra, **save_kw)
    test = evaluate(model, data.test, device, amp=args.amp)
    out = {"cfg": meta["cfg"], "data_set": args.data_set, "rates": meta.get("rates"),
           "widths": meta.get("widths"), "flops": macs, "params": params,
           "base_flops": base_macs, "base_params": base_params,
           "flops_reduction": 1 - macs / base_macs if base_macs else None,
           "params_reduction": 1 - params / base_params if base_params else None,
           "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch,
           "test_acc": test["acc"], "test_top5": test["top5"], "epochs": args.num_epochs,
           "acc_before_sketch": meta.get("acc_before_sketch"),
           "acc_after_sketch": meta.get("acc_after_sketch"),
           "checkpoint": str(ckpt / "model_best.pt"), "world_size": _world_size()}
    if rank0:
        atomic_write_text(job / "result.json", json.dumps(out, indent=2))
    log.info("best val acc %s (epoch %d); test acc of the best model %s (top-5 %s)",
             _pct(result.best_val_acc), result.best_epoch + 1, _pct(test["acc"]),
             _pct(test["top5"]))
    log.info("FLOPs (MACs) %s (reduced %s), params %s (reduced %s); best model: %s",
             _human(macs), _reduction(base_macs, macs), _human(params),
             _reduction(base_params, params), ckpt / "model_best.pt")
    return out


def _test_only(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import sketch_core as sc
    from ..train import evaluate, load_state

    data = _load_data(args, device)
    kw = dict(cfg=args.cfg, data_set=args.data_set, num_classes=data.num_classes,
              in_channels=data.in_channels)
    if args.refine or args.sketch_model:
        source = args.refine or args.sketch_model
        model = sc.load_checkpoint(source, **kw).model
    elif args.resume:
        source = _state_path(args.resume)
        state = load_state(source)
        meta = state["meta"]
        model = sc.build_model(meta["cfg"], args.data_set, widths=meta.get("widths"),
                               num_classes=data.num_classes, in_channels=data.in_channels)
        model.load_state_dict(state["model"])
    else:
        raise UserError("--test_only evaluates a checkpoint: pass --refine, --resume or "
                        "--sketch_model")
    model = model.to(device)
    _check_forward(model, data, args.cfg or "the model")
    test = evaluate(model, data.test, device, amp=args.amp)
    macs, params = sc.count_flops(model, data.shape)
    print(f"{source}: test acc {_pct(test['acc'])} (top-5 {_pct(test['top5'])}, loss "
          f"{test['loss']:.4f}) on {test['n']} images; FLOPs (MACs) {_human(macs)}, params "
          f"{_human(params)}")
    return {"test_acc": test["acc"], "test_top5": test["top5"], "flops": macs, "params": params}


def run(args: argparse.Namespace) -> int:
    """``launch.py sketch|pretrain`` on one device (several GPUs: see ``search.cli.train_runs``)."""
    check_args(args)
    devices = select_devices(args.gpus)
    if len(devices) > 1:
        raise UserError("several --gpus run through Ray Train: use launch.py, which sends "
                        "them to search.distributed")
    if args.test_only:
        _test_only(args, devices[0])
        return 0
    job = prepare_job_dir(args)
    with _logging_to(job), _stop_on_signals(True) as caught:
        from ..train import TrainingInterrupted

        log.info("launch.py %s %s", args.command_name, _command_line(args))
        try:
            execute(args, devices[0], stop=caught)
        except TrainingInterrupted as exc:
            log.info("%s; continue with --resume %s", exc, exc.state_path)
            return 128 + caught()
    return 0
