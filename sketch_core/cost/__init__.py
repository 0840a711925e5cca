"""What a network costs: MACs and parameters, measured latency and latency tables."""
