"""Reference networks and a registry. No algorithm in nncompress requires these models."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
    "default_kwargs",
    "list_models",
]


#: how a model reads its input: ``features`` (``in_features`` = all input values, an MLP),
#: ``image`` (``in_channels`` and ``image_size``), ``channels`` (``in_channels`` only),
#: ``tokens`` (a language model: token ids, no dataset-derived arguments)
INPUTS = ("features", "image", "channels", "tokens")


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its factory, a description, and how it reads its input."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    inputs: str = "channels"

    def kwargs_for(self, input_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
        """Constructor arguments fitting a dataset's sample shape and class count."""
        if self.inputs == "tokens":
            raise ValueError(
                f"model={self.name!r} is a language model (token ids in, next-token logits "
                "out): it has no classifier for an image dataset"
            )
        kwargs: dict[str, Any] = {"num_classes": num_classes}
        if self.inputs == "features":
            kwargs["in_features"] = int(math.prod(input_shape))
        elif self.inputs == "image":
            kwargs.update(in_channels=input_shape[0], image_size=input_shape[-1])
        else:
            kwargs["in_channels"] = input_shape[0]
        return kwargs


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def make(**kwargs) -> nn.Module:
        return CifarResNet(depth=depth, **kwargs)

    return make


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            "lenet-300-100",
            LeNet300100,
            "MLP 784-300-100-10 (Han 2015), 266,610 params",
            "features",
        ),
        ModelInfo(
            "lenet-5", LeNet5, "Caffe LeNet-5 conv20-conv50-fc500-fc10, 431,080 params", "image"
        ),
        ModelInfo(
            "resnet-20", _resnet(20), "CIFAR-style ResNet-20 (16/32/64 ch), option-B shortcuts"
        ),
        ModelInfo(
            "resnet-56", _resnet(56), "CIFAR-style ResNet-56 (16/32/64 ch), option-B shortcuts"
        ),
        ModelInfo(
            "vgg-small", SmallVGG, "VGG-style 6 conv (32/64/128) + 2 FC with BatchNorm", "image"
        ),
        ModelInfo("vit-tiny", ViTTiny, "ViT, 7x7 patches, dim 128, depth 6, ~0.8M params", "image"),
        ModelInfo(
            "char-gpt",
            CharGPT,
            "character-level GPT, context 128, dim 128, depth 4, tied head",
            "tokens",
        ),
    )
}


def default_kwargs(name: str, input_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
    """Constructor arguments of registry model ``name`` for a dataset (see
    :meth:`ModelInfo.kwargs_for`)."""
    if name not in MODELS:
        raise ValueError(f"model={name!r}: must be one of {sorted(MODELS)}")
    return MODELS[name].kwargs_for(input_shape, num_classes)


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
