"""Evaluation metrics as torchmetrics `Metric`s (synced across ranks)."""
