"""Training code for streamd's ONNX models (optional ``[train]`` extra: torch and onnx).

Only this package imports torch (not its fusion, adaptation and scoring modules, which need
onnx and numpy only); the daemon itself runs the exported ONNX files.
Features always come from :mod:`streamd.signal.features` and :mod:`streamd.signal.vad`, exactly as the
daemon computes them, so training and serving cannot drift.
"""
