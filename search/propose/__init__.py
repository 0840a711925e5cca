"""Proposing rate vectors: the space and its cost model, the Optuna study, the samplers, the proposer."""
