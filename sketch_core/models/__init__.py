"""The registered model families, one file each; see :mod:`sketch_core.models.registration`."""
