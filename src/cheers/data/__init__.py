"""Data: the release's jsonl records and the synthetic ShapesWorld."""
