"""Narrowing a pretrained network: Frequent Directions, the sketch and select modes, the least-squares refit, BN recalibration."""
