"""Data sets and loaders: the bundled and folder sets, their caches, normalisation, subsets."""
