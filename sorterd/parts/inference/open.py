"""Open the `[inference]` backend a config names (the run's one way to get a `Model`)."""

from __future__ import annotations

from pathlib import Path

from sorterd.parts.inference import InferenceOptions, Model


def open_model(options: InferenceOptions, bundle: Path) -> Model:
    """onnxruntime opens at once; tensorrt opens onnxruntime at once and builds its engine in the background."""
    from sorterd.parts.inference.tensorrt import TensorRTInferenceConfig, TensorRTModel

    if isinstance(options, TensorRTInferenceConfig):
        return TensorRTModel(bundle, options)
    from sorterd.parts.inference.onnxruntime import OnnxModel

    return OnnxModel(bundle, options.threads, options.providers)
