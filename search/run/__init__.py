"""Running trials: the Ray Tune driver, the Ray-free local loop, the trial, schedulers, the retrain."""
