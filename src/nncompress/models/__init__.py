"""Reference networks and a registry. No algorithm in nncompress requires these models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .gpt import CharGPT
from .lenet import LeNet5, LeNet300100
from .resnet import BasicBlock, CifarResNet
from .vgg import SmallVGG
from .vit import ViTTiny

__all__ = [
    "MODELS",
    "BasicBlock",
    "CharGPT",
    "CifarResNet",
    "LeNet300100",
    "LeNet5",
    "ModelInfo",
    "SmallVGG",
    "ViTTiny",
    "create",
    "list_models",
]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    factory: Callable[..., nn.Module]
    description: str


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def make(**kwargs) -> nn.Module:
        return CifarResNet(depth=depth, **kwargs)

    return make


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo("lenet-300-100", LeNet300100, "MLP 784-300-100-10 (Han 2015), 266,610 params"),
        ModelInfo("lenet-5", LeNet5, "Caffe LeNet-5 conv20-conv50-fc500-fc10, 431,080 params"),
        ModelInfo(
            "resnet-20", _resnet(20), "CIFAR-style ResNet-20 (16/32/64 ch), option-B shortcuts"
        ),
        ModelInfo(
            "resnet-56", _resnet(56), "CIFAR-style ResNet-56 (16/32/64 ch), option-B shortcuts"
        ),
        ModelInfo("vgg-small", SmallVGG, "VGG-style 6 conv (32/64/128) + 2 FC with BatchNorm"),
        ModelInfo("vit-tiny", ViTTiny, "ViT, 7x7 patches, dim 128, depth 6, ~0.8M params"),
        ModelInfo(
            "char-gpt", CharGPT, "character-level GPT, context 128, dim 128, depth 4, tied head"
        ),
    )
}


def list_models() -> list[ModelInfo]:
    return list(MODELS.values())


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create("lenet-5", num_classes=10)``."""
    if name not in MODELS:
        raise ValueError(f"model={name!r}: must be one of {sorted(MODELS)}")
    try:
        return MODELS[name].factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"model={name!r}: bad constructor arguments {kwargs}: {exc}") from exc
