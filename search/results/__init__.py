"""Reading results: the trial record, trials.jsonl, the Pareto front, budgets, picks, the DataFrame, plots."""
