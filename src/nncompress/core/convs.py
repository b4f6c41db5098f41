"""Convolution subclasses that pad inside their own ``forward``.

Ports of TensorFlow models (EfficientNet, MobileNet ports, timm's ``Conv2dSame``) subclass
``nn.Conv2d`` and override ``forward`` to pad "same" before calling ``F.conv2d``: the module *is*
a convolution, but the padding it applies is not in ``self.padding``. ``torch.fx`` traces into
such a subclass (it is not a ``torch.nn`` leaf), so a tool looking for Conv2d modules in the
graph sees a bare ``torch.conv2d`` call instead, and a tool that rebuilds the layer from its
attributes drops the padding.

:func:`conv_form` recognises the pattern by tracing the module's ``forward`` on an example
input with ``make_fx`` (ATen level, so padding computed from the input size resolves to
numbers): the forward must be zero or more *constant zero* paddings of the input followed by
one convolution with the module's own ``weight``, ``bias``, ``stride``, ``dilation`` and
``groups``. Such a module is a :class:`ConvForm`: ``pad`` (``F.pad`` order) then the
convolution with symmetric ``padding``. Anything else (weight standardisation, a scale, a
non-zero pad value, reflection padding) is not recognised, and families treat the module as
the opaque code it is. :func:`is_conv_leaf` is what :func:`nncompress.core.fx.trace` asks to
keep recognised subclasses as single ``call_module`` nodes, so every family sees them as the
convolutions they are.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "ConvForm",
    "conv_form",
    "describe_conv",
    "is_conv_leaf",
    "is_conv_subclass",
    "resized_conv",
    "unrecognised_conv_message",
]

_CONVS = (nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class ConvForm:
    """What a (subclassed) convolution computes on one input size.

    Attributes
    ----------
    pad : extra zero padding applied before the convolution, in ``F.pad`` order (last dim
        first: ``(left, right, top, bottom)`` for 2-D); all zeros for a plain conv.
    padding : the convolution's own (symmetric) padding per spatial dim.
    dynamic : the padding depends on the input size (computed in ``forward``), so ``pad`` holds
        for the input size it was measured on only.
    """

    pad: tuple[int, ...]
    padding: tuple[int, ...]
    dynamic: bool = False

    @property
    def has_extra_pad(self) -> bool:
        return any(self.pad)

    def total_padding(self) -> tuple[tuple[int, int], ...] | None:
        """Per spatial dim (first dim first) ``(before, after)`` padding of pad + conv."""
        n = len(self.padding)
        out = []
        for d in range(n):
            lo, hi = self.pad[2 * (n - 1 - d)], self.pad[2 * (n - 1 - d) + 1]
            out.append((lo + self.padding[d], hi + self.padding[d]))
        return tuple(out)


def _plain(module: nn.Module) -> type:
    if parametrize.is_parametrized(module):
        return parametrize.type_before_parametrizations(module)
    return type(module)


def is_conv_subclass(module: nn.Module) -> bool:
    """A Conv1d/Conv2d whose class is a subclass (not ``nn.Conv1d``/``nn.Conv2d`` itself)."""
    return isinstance(module, _CONVS) and _plain(module) not in _CONVS


def _spatial(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Conv1d) else 2


def _dummy_shape(module: nn.Module, bump: int = 0) -> tuple[int, ...]:
    k = [(k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation, strict=True)]
    size = max(12, 2 * max(k) + 2 * max(module.stride)) + bump
    return (module.in_channels, *([size] * _spatial(module)))


def _trace_aten(module: nn.Module, shape: tuple[int, ...]) -> Any:
    """``make_fx`` graph of ``module``'s forward on zeros of ``(1, *shape)``; the parameters
    are the first placeholders (``weight``, then ``bias``)."""
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    if parametrize.is_parametrized(module):  # trace the effective conv, not the parametrization
        from .modules import strip_parametrizations_

        module = strip_parametrizations_(copy.deepcopy(module))
    params = {"weight": module.weight}
    if module.bias is not None:
        params["bias"] = module.bias
    x = torch.zeros(1, *shape, dtype=module.weight.dtype, device=module.weight.device)
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return make_fx(lambda p, inp: functional_call(module, p, (inp,)))(params, x)
    finally:
        module.train(was)


_PASS = ("aten.alias.default", "aten.clone.default", "aten.contiguous.default")


def _match(gm: Any, module: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """``(pad, padding)`` if the traced graph is zero padding + one convolution with the
    module's parameters and attributes; otherwise the reason it is not."""
    aten = torch.ops.aten
    nodes = list(gm.graph.nodes)
    ph = [n for n in nodes if n.op == "placeholder"]
    w_node, b_node, x_node = ph[0], (ph[1] if module.bias is not None else None), ph[-1]
    n_sp = _spatial(module)
    pad = [0] * (2 * n_sp)
    cur, conv = x_node, None
    for n in nodes:
        if n.op in ("placeholder", "output"):
            continue
        if n.op != "call_function":
            return f"its forward contains {n.op} {n.target}"
        t = n.target
        if conv is not None:
            return f"its forward computes {t} after the convolution"
        if t in (aten.constant_pad_nd.default, aten.pad.default) and n.args[0] is cur:
            amounts = list(n.args[1])
            value = n.args[2] if len(n.args) > 2 else 0.0
            if t is aten.pad.default:
                mode = n.args[2] if len(n.args) > 2 else "constant"
                value = n.args[3] if len(n.args) > 3 else 0.0
                if mode != "constant":
                    return f"it pads with mode={mode!r} (only zero padding is understood)"
            if (value or 0.0) != 0.0:
                return f"it pads with value {value} (only zero padding is understood)"
            if len(amounts) != 2 * n_sp or any(a < 0 for a in amounts):
                return f"it pads {amounts} (only non-negative padding of the spatial dims)"
            pad = [p + a for p, a in zip(pad, amounts, strict=True)]
            cur = n
        elif str(t) in _PASS and n.args[0] is cur:
            cur = n
        elif t is aten.convolution.default:
            inp, w, b, stride, padding, dilation, transposed, _, groups = n.args
            if inp is not cur or w is not w_node or b is not b_node:
                return "its convolution does not read the padded input with its own weight/bias"
            if transposed:
                return "its convolution is transposed"
            if (
                tuple(stride) != tuple(module.stride)
                or tuple(dilation) != tuple(module.dilation)
                or groups != module.groups
            ):
                return (
                    f"its convolution uses stride={tuple(stride)}, dilation={tuple(dilation)}, "
                    f"groups={groups}, not the module's attributes"
                )
            conv = (tuple(pad), tuple(int(p) for p in padding))
            cur = n
        else:
            return f"its forward computes {t}"
    out = nodes[-1].args[0]
    out = out[0] if isinstance(out, list | tuple) and len(out) == 1 else out
    if conv is None:
        return "its forward has no convolution"
    if out is not cur:
        return "its forward does not return the convolution's output"
    return conv


_RECOGNISED: dict[tuple, bool] = {}


def _key(module: nn.Module) -> tuple:
    return (
        _plain(module),
        module.in_channels,
        module.out_channels,
        tuple(module.kernel_size),
        tuple(module.stride),
        str(module.padding),
        tuple(module.dilation),
        module.groups,
        module.bias is None,
        module.padding_mode,
    )


def conv_form(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> ConvForm | str:
    """What a Conv1d/Conv2d module computes, or the reason it is not a padded convolution.

    Parameters
    ----------
    module : an ``nn.Conv1d`` / ``nn.Conv2d`` (subclasses included).
    input_shape : one sample's input to the module, e.g. ``(C, H, W)``; a small dummy size
        when ``None`` (exact for static padding; :attr:`ConvForm.dynamic` tells when the
        padding follows the input size).

    Returns
    -------
    ConvForm or str
        The padding of the recognised pattern, or a sentence saying why the module's
        ``forward`` is not zero padding followed by its convolution.
    """
    if not isinstance(module, _CONVS):
        return f"{type(module).__name__} is not a Conv1d/Conv2d"
    n_sp = _spatial(module)
    if not is_conv_subclass(module) and module.padding_mode == "zeros":
        if not isinstance(module.padding, str):
            return ConvForm((0,) * (2 * n_sp), tuple(int(p) for p in module.padding))
    shape = tuple(input_shape) if input_shape is not None else _dummy_shape(module)
    try:
        gm = _trace_aten(module, shape)
    except Exception as exc:  # noqa: BLE001 - any failure means: not recognised
        return f"its forward failed on an input of shape {(1, *shape)}: {type(exc).__name__}: {exc}"
    found = _match(gm, module)
    if isinstance(found, str):
        return found
    pad, padding = found
    other = shape[:1] + tuple(s + 1 for s in shape[1:])
    try:
        again = _match(_trace_aten(module, other), module)
    except Exception:  # noqa: BLE001
        again = found
    dynamic = not isinstance(again, str) and again != found
    return ConvForm(pad, padding, dynamic)


def is_conv_leaf(module: nn.Module) -> bool:
    """A conv subclass whose forward is zero padding + its convolution (cached per class and
    attributes): tracing keeps it as one module call."""
    if not is_conv_subclass(module):
        return isinstance(module, _CONVS)
    key = _key(module)
    if key not in _RECOGNISED:
        _RECOGNISED[key] = isinstance(conv_form(module), ConvForm)
    return _RECOGNISED[key]


def describe_conv(module: nn.Module) -> str:
    """``Conv2dSame (Conv2d subclass)`` or ``Conv2d``."""
    name = _plain(module).__name__
    if is_conv_subclass(module):
        base = "Conv1d" if isinstance(module, nn.Conv1d) else "Conv2d"
        return f"{name} ({base} subclass)"
    return name


def unrecognised_conv_message(name: str, module: nn.Module, reason: str | None = None) -> str:
    """Why a conv subclass is left alone, and how to adapt it."""
    reason = reason or str(conv_form(module))
    return (
        f"'{name}' is a {describe_conv(module)} whose forward is not zero padding followed by "
        f"its convolution ({reason}); rewrite its forward as F.pad(x, pads) + "
        "F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, "
        "self.groups), or replace it by nn.ZeroPad2d + nn.Conv2d"
    )


def resized_conv(
    module: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    groups: int | None = None,
) -> nn.Module:
    """A copy of a conv module (its class, padding logic and attributes kept; parametrizations
    dropped) holding ``weight`` ``(C_out, C_in / groups, *k)`` and ``bias``: a thinned or
    low-rank factor that still pads the way the original's ``forward`` does."""
    from .modules import strip_parametrizations_

    new = copy.deepcopy(module)
    strip_parametrizations_(new)
    groups = module.groups if groups is None else groups
    new.groups = groups
    new.out_channels = int(weight.shape[0])
    new.in_channels = int(weight.shape[1]) * groups
    new.kernel_size = tuple(int(k) for k in weight.shape[2:])
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=module.weight.requires_grad)
    if bias is None:
        new.bias = None
    else:
        new.bias = nn.Parameter(bias.detach().clone())
    return new
