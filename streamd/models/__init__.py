"""Models: ONNX sessions and their cards, batching, the digit fusion and cascade, and the
template match of words taught at run time."""
