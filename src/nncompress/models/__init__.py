"""Reference networks and a registry. No algorithm in nncompress requires these models."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .gpt import CharGPT
from .lenet import LeNet5, LeNet300100
from .mobile import ACTIVATIONS, Conv2dSame, EfficientNetLite, MobileNetV2
from .resnet import BasicBlock, CifarResNet
from .vgg import SmallVGG
from .vit import ViTTiny

__all__ = [
    "MODELS",
    "BasicBlock",
    "CharGPT",
    "CifarResNet",
    "Conv2dSame",
    "EfficientNetLite",
    "LeNet300100",
    "LeNet5",
    "MobileNetV2",
    "ModelInfo",
    "SmallVGG",
    "ViTTiny",
    "check_kwargs",
    "create",
    "default_kwargs",
    "list_models",
    "registry_entry",
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

    sig = inspect.signature(CifarResNet)
    make.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for p in sig.parameters.values() if p.name != "depth"]
    )
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
        ModelInfo(
            "mobilenet-v2",
            MobileNetV2,
            "MobileNetV2 for 28x28 (ReLU6, depthwise inverted residuals), 149k params",
        ),
        ModelInfo(
            "efficientnet-lite",
            EfficientNetLite,
            "EfficientNet-style MBConv net, SiLU + squeeze-excite, every conv a 'same'-padding "
            "Conv2d subclass, 110k params",
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


# ranges of the registry models' constructor arguments: what a recipe, a checkpoint sidecar
# or a .ncz file may ask for (checked before a model is built)
KWARG_RANGES: dict[str, tuple[type, float, float]] = {
    "num_classes": (int, 1, 1 << 20),
    "in_features": (int, 1, 1 << 24),
    "in_channels": (int, 1, 1 << 12),
    "image_size": (int, 1, 1 << 12),
    "width": (int, 1, 1 << 12),
    "width_mult": (float, 0.05, 16.0),
    "se": (float, 0.0, 1.0),
    "dropout": (float, 0.0, 1.0),
    # transformers (vit-tiny, char-gpt)
    "patch": (int, 1, 1 << 12),
    "dim": (int, 1, 1 << 16),
    "depth": (int, 1, 1 << 10),
    "heads": (int, 1, 1 << 10),
    "mlp_ratio": (float, 1 / 64, 64.0),
    "vocab_size": (int, 1, 1 << 24),
    "block_size": (int, 1, 1 << 20),
    "tie": (bool, 0, 1),
}


def check_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse constructor arguments of registry model ``name`` that it does not take, or
    whose type or range is wrong (:data:`KWARG_RANGES`; ``cfg`` of vgg-small: at most 64
    channel counts in [1, 4096] or 'M'). Raises ``ValueError`` naming the argument."""
    if name not in MODELS:
        raise ValueError(f"model={name!r}: must be one of {sorted(MODELS)}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"model {name!r}: arguments must be a mapping, got {kwargs!r:.80}")
    allowed = [p for p in inspect.signature(MODELS[name].factory).parameters if p != "self"]
    unknown = sorted(str(k) for k in kwargs if k not in allowed)
    if unknown:
        raise ValueError(f"model {name!r}: unknown argument(s) {unknown}; allowed: {allowed}")
    for k, v in kwargs.items():
        if k == "act":
            if v not in ACTIVATIONS:
                raise ValueError(f"model {name!r}: act={v!r:.80}: must be one of {ACTIVATIONS}")
            continue
        if k == "cfg":
            ok = (
                isinstance(v, list | tuple)
                and 0 < len(v) <= 64
                and all(
                    c == "M" or (isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 4096)
                    for c in v
                )
            )
            if not ok:
                raise ValueError(
                    f"model {name!r}: cfg={v!r:.80}: must be a list of at most 64 channel "
                    "counts in [1, 4096] or 'M'"
                )
            continue
        kind, lo, hi = KWARG_RANGES[k]
        if kind is bool:
            if not isinstance(v, bool):
                raise ValueError(f"model {name!r}: {k}={v!r:.80}: must be true or false")
            continue
        is_num = isinstance(v, int | float) and not isinstance(v, bool)
        ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else is_num
        if not ok or not lo <= v <= hi or (is_num and not math.isfinite(v)):
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"model {name!r}: {k}={v!r:.80}: must be {what} in [{lo}, {hi}]")


def list_models() -> list[ModelInfo]:
    return list(MODELS.values())


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create("lenet-5", num_classes=10)``."""
    check_kwargs(name, kwargs)
    try:
        model = MODELS[name].factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"model={name!r}: bad constructor arguments {kwargs}: {exc}") from exc
    # what nncompress.engine.modspec.describe_model records for files saved from Python
    model.nncompress_registry = {"model": name, "kwargs": dict(kwargs)}
    return model


def registry_entry(model: nn.Module) -> dict[str, Any] | None:
    """``{"model": name, "kwargs": {...}}`` of a model built by :func:`create` (kept by
    ``copy.deepcopy``), else ``None``."""
    entry = getattr(model, "nncompress_registry", None)
    if isinstance(entry, dict) and entry.get("model") in MODELS:
        return entry
    return None
