"""Training code for streamd's ONNX models (optional ``[train]`` extra: needs torch).

Only this package imports torch; the daemon itself runs the exported ONNX files.
Features always come from :mod:`streamd.features` and :mod:`streamd.vad`, exactly as the
daemon computes them, so training and serving cannot drift.
"""
