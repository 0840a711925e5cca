"""search: the per-layer rate search over sketch_core (Ray Tune, Optuna, the results).

Grouped by concern, in import order (a group imports only the groups before it)::

    search.results     the trial record, budgets, Pareto front, picks, the DataFrame, plots
    search.propose     the rate space and its cost model, the Optuna study and samplers
    search.experiment  the config, the experiment folder, the baseline, the plan
    search.run         one trial, the Ray driver and the Ray-free loop, schedulers, retrain
    search.cli         launch.py search | retrain | analyze
"""
