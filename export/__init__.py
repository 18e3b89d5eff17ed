"""Checkpoint -> ONNX model directory (export/export.py)."""
