"""Files: checkpoints of every layout, export to ONNX and torch.export, atomic writes."""
