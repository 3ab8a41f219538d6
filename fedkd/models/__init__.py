"""Student models: an MLP, two CNNs and a GroupNorm ResNet, all DP-compatible."""

from fedkd.models.zoo import MODEL_NAMES, ModelError, build_model, count_parameters

__all__ = ["MODEL_NAMES", "ModelError", "build_model", "count_parameters"]
