"""ONNX Runtime predictor, model metadata checks and the bundled models (``model/zoo/``)."""
