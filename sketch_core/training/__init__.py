"""The fine-tune loop: fit and evaluate, its hooks, the CUDA-graph step."""
