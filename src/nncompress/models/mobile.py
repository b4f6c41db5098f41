"""Mobile CNNs adapted to 28x28 inputs: MobileNetV2 and an EfficientNet-Lite-style network.

Both are built from depthwise-separable inverted-residual blocks, the layer mix that
distinguishes production mobile models from the ResNets of the rest of the zoo: expansion 1x1
convolutions, depthwise 3x3 / 5x5 convolutions, linear 1x1 projections, residual additions
between blocks of equal shape, and (in the EfficientNet-style net) squeeze-and-excitation
gates that multiply every channel by a learned sigmoid.

* :class:`MobileNetV2` (Sandler et al., CVPR 2018, "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks"): ReLU6 everywhere, plain ``nn.Conv2d``, stem stride 1 (28x28 input), three
  downsamplings fewer than the ImageNet network.
* :class:`EfficientNetLite` (Tan & Le, ICML 2019, MBConv blocks; the "Lite" layout of
  Tan & Le's TF-Lite release): every convolution is a :class:`Conv2dSame` - a ``nn.Conv2d``
  subclass that pads "same" inside its own ``forward`` from the input size, as PyTorch ports of
  TensorFlow models do - and by default SiLU activations and squeeze-and-excitation gates as in
  EfficientNet-B0 (``act='relu6', se=False`` gives the Lite variant).

The default widths keep one training epoch on Fashion-MNIST to about two minutes on one CPU
thread (``benchmarks/mobile.py`` records the measured time); ``width_mult`` scales every stage.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..engine.modspec import register_module

__all__ = [
    "ACTIVATIONS",
    "Conv2dSame",
    "EfficientNetLite",
    "InvertedResidual",
    "MobileNetV2",
    "SqueezeExcite",
]

_ACTS = {"relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish, "relu": nn.ReLU}
#: the activations the mobile nets accept (``act=``)
ACTIVATIONS = tuple(sorted(_ACTS))


def _act(name: str) -> nn.Module:
    if name not in _ACTS:
        raise ValueError(f"act={name!r}: must be one of {sorted(_ACTS)}")
    return _ACTS[name]()


@register_module
class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed in ``forward`` from the input size.

    Output size ``ceil(H / stride)``; the total padding ``max((ceil(H/s) - 1) s + (k - 1) d + 1
    - H, 0)`` is split with the extra pixel at the bottom/right (TensorFlow's rule), so a
    stride-2 convolution on an even input pads asymmetrically. ``self.padding`` stays 0: the
    padding lives only in ``forward``, which is what makes such modules hard for tools that read
    the attributes of ``nn.Conv2d`` alone.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def spec_kwargs(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": int(self.kernel_size[0]),
            "stride": int(self.stride[0]),
            "dilation": int(self.dilation[0]),
            "groups": self.groups,
            "bias": self.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s, d in zip(
            (iw, ih), self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1], strict=True
        ):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)  # (B, C, H + pad_h, W + pad_w)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate (Hu et al., CVPR 2018): ``x * sigmoid(W2 act(W1 mean(x)))``
    with 1x1 convolutions ``C -> r -> C``; the multiply couples the gate's channels with x's."""

    def __init__(self, channels: int, reduced: int, act: str = "silu", conv=nn.Conv2d) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = conv(channels, reduced, 1)
        self.act = _act(act)
        self.expand = conv(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))  # (B, C, 1, 1)
        return x * s


def _conv_bn(conv, cin: int, cout: int, k: int, stride: int, groups: int, act: str | None):
    if conv is nn.Conv2d:
        c = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
    else:
        c = conv(cin, cout, k, stride, groups=groups, bias=False)
    layers = [c, nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(_act(act))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 / MBConv block: [1x1 expand -> act] -> kxk depthwise -> act -> [SE] ->
    1x1 linear projection, plus the input when stride is 1 and the widths match."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        expand: int,
        kernel: int = 3,
        act: str = "relu6",
        se: float = 0.0,
        conv=nn.Conv2d,
    ) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.expand = _conv_bn(conv, cin, hidden, 1, 1, 1, act) if expand != 1 else None
        self.depthwise = _conv_bn(conv, hidden, hidden, kernel, stride, hidden, act)
        self.se = SqueezeExcite(hidden, max(1, int(cin * se)), act, conv) if se > 0 else None
        self.project = _conv_bn(conv, hidden, cout, 1, 1, 1, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x  # (B, hidden, H, W)
        out = self.depthwise(out)  # (B, hidden, H/s, W/s)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)  # (B, cout, H/s, W/s)
        return out + x if self.use_residual else out


def _scaled(c: int, width: float) -> int:
    return max(4, int(round(c * width / 4)) * 4)


class _MobileNet(nn.Module):
    # (expansion, channels, repeats, stride, kernel)
    STAGES: tuple[tuple[int, int, int, int, int], ...] = ()

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width: float,
        act: str,
        se: float,
        conv,
        head: int,
        dropout: float,
    ) -> None:
        super().__init__()
        stem = _scaled(16, width)
        self.stem = _conv_bn(conv, in_channels, stem, 3, 1, 1, act)
        blocks, cin = [], stem
        for t, c, n, s, k in self.STAGES:
            cout = _scaled(c, width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, k, act, se, conv))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(conv, cin, _scaled(head, width), 1, 1, 1, act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(_scaled(head, width), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, 16w, 28, 28)
        x = self.head(self.blocks(x))  # (B, head, 7, 7)
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))  # (B, classes)


class MobileNetV2(_MobileNet):
    """MobileNetV2 for 28x28 inputs (see the module docstring): 16-channel stem at stride 1,
    inverted residual stages (t, c, n, s) = (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2),
    (6, 64, 2, 1), a 1x1 head to 256 channels, global pooling and a linear classifier."""

    STAGES = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 32, 3, 2, 3), (6, 64, 2, 1, 3))

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width_mult: float = 1.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(
            num_classes, in_channels, width_mult, "relu6", 0.0, nn.Conv2d, 256, dropout
        )


class EfficientNetLite(_MobileNet):
    """EfficientNet-style MBConv network for 28x28 inputs whose every convolution is a
    :class:`Conv2dSame` (padding inside ``forward``): stages (t, c, n, s, k) = (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 64, 2, 1, 3), SiLU and squeeze-and-excitation
    (ratio 0.25 of the block input) by default; ``act='relu6', se=0`` is the Lite variant.
    Default width 0.75 (110k parameters, 6.3M MACs at 28x28)."""

    STAGES = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 64, 2, 1, 3))

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width_mult: float = 0.75,
        dropout: float = 0.1,
        act: str = "silu",
        se: float = 0.25,
    ) -> None:
        if not 0.0 <= se <= 1.0:
            raise ValueError(f"se={se}: must be in [0, 1]")
        super().__init__(num_classes, in_channels, width_mult, act, se, Conv2dSame, 256, dropout)
