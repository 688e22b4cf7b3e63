"""Fusion of imaging, clinical and genomic data: training data, model and metrics."""
