"""sketch_core: everything about one model (no Ray, no Optuna, no pydantic in here).

Where things live (import them from their modules)::

    sketch_core.registry      resolve_arch(cfg, data_set, ...) -> Arch; build_model(cfg, ...)
    sketch_core.rates         parse_rates(text, arch), format_rates(rates), rates_to_widths(...)
    sketch_core.plans         what each rate controls; widths_for(plan, rates)
    sketch_core.options       SketchOptions (how to prune), Recipe (how to train)
    sketch_core.pipeline      prune_and_finetune(...), prune_and_score(...): the one run
    sketch_core.pruning.prune sketch(model, arch, widths, options, batches=...)
    sketch_core.pruning.fd    frequent_directions(matrix, rows)
    sketch_core.pruning.bn    recalibrate_bn(model, batches)
    sketch_core.cost.flops    count_flops(model, input_shape) -> (MACs, params)
    sketch_core.io.checkpoint load_checkpoint(path, cfg, ...), save_checkpoint(path, model, ...)
    sketch_core.jobs          execute(RunSpec): the `sketch` / `pretrain` job
    sketch_core.errors        UserError: bad input, said in one line
"""
