"""One experiment: the config schema, the folder and its manifest, the baseline, which images choose and report."""
