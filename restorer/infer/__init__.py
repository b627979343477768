"""Inference: a trained network over whole photos in tiles, the metrics, the pictures."""
