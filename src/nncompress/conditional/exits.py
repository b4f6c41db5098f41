"""Early-exit networks: side classifiers after intermediate blocks of any ``nn.Module``.

A sample leaves at the first exit whose confidence reaches that exit's threshold, so easy
inputs pay for only part of the network (Teerapittayanon et al. 2016, "BranchyNet: Fast
Inference via Early Exiting from Deep Neural Networks"; Bolukbasi et al. 2017, "Adaptive Neural
Networks for Efficient Inference").

:func:`attach_exits_` wraps a model in an :class:`EarlyExitNet` that holds the model itself (not a
copy) as ``backbone`` and one small head per exit point. The backbone is left untouched: the
heads read the outputs of the named submodules through forward hooks that exist only while the
wrapper runs. At inference a hook also *removes* the samples that left from the batch it returns,
so the rest of the backbone computes only the samples still in flight; when none is left the
forward stops. This needs every exit point to be a cut of the forward pass (nothing computed
before it is used after it): :func:`attach_exits_` checks that on a probe batch.

Confidences and the threshold rule: :mod:`nncompress.conditional.base`. With every
threshold at 1.0 the network computes exactly the original model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import model_device
from ..core.validate import check, is_int
from ..engine.modspec import register_module
from .base import CONFIDENCES, ConditionalModel, ExitPrediction, check_thresholds, confidence

__all__ = ["HEADS", "EarlyExitNet", "ExitConfig", "attach_exits_", "make_head"]

log = logging.getLogger(__name__)

HEADS = ("pool-linear", "conv-pool-linear")


@dataclass(frozen=True)
class ExitConfig:
    """Where to attach exits and what they look like (frozen; JSON/YAML-serialisable).

    Attributes
    ----------
    after : names of submodules (``model.get_submodule`` paths, e.g. ``"layer1"``) after which
        an exit reads the features, in the order the forward pass runs them.
    head : ``"pool-linear"`` (global average pool + Linear; a Linear on feature vectors) or
        ``"conv-pool-linear"`` (3x3 conv + BatchNorm + ReLU, then pool + Linear; feature maps
        only).
    head_channels : output channels of the conv head (default: twice the input channels).
    head_stride : stride of the conv head's 3x3 convolution (2 quarters its MACs).
    thresholds : initial per-exit thresholds (default 1.0 each: every exit closed until
        calibrated).
    confidence : ``"max-softmax"`` or ``"entropy"``.
    """

    after: tuple[str, ...] = ()
    head: str = "pool-linear"
    head_channels: int | None = None
    head_stride: int = 2
    thresholds: tuple[float, ...] | None = None
    confidence: str = "max-softmax"

    def __post_init__(self) -> None:
        after = (self.after,) if isinstance(self.after, str) else self.after
        if not isinstance(after, (list, tuple)) or not after:
            raise ConfigError(f"after={self.after!r}: must name at least one submodule")
        for name in after:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"after={list(after)!r}: every entry must be a module name")
        if len(set(after)) != len(after):
            raise ConfigError(f"after={list(after)!r}: names must be distinct")
        object.__setattr__(self, "after", tuple(after))
        check(self.head in HEADS, "head", self.head, f"must be one of {HEADS}")
        check(
            self.head_channels is None or (is_int(self.head_channels) and self.head_channels >= 1),
            "head_channels",
            self.head_channels,
            "must be an integer >= 1 or null",
        )
        check(
            is_int(self.head_stride) and self.head_stride >= 1,
            "head_stride",
            self.head_stride,
            "must be an integer >= 1",
        )
        if self.thresholds is not None:
            object.__setattr__(
                self, "thresholds", check_thresholds(self.thresholds, len(self.after))
            )
        check(
            self.confidence in CONFIDENCES,
            "confidence",
            self.confidence,
            f"must be one of {CONFIDENCES}",
        )


def make_head(
    feature_shape: Sequence[int],
    num_classes: int,
    kind: str = "pool-linear",
    *,
    channels: int | None = None,
    stride: int = 2,
    where: str = "",
) -> nn.Sequential:
    """An exit head for features of ``feature_shape`` (one sample: ``(C, H, W)`` or ``(F,)``).

    Built from standard layers only, so checkpoints describe it without new module types.
    """
    if kind not in HEADS:
        raise ConfigError(f"head={kind!r}: must be one of {HEADS}")
    if len(feature_shape) == 1:
        if kind != "pool-linear":
            raise ConfigError(
                f"head={kind!r} for exit '{where}': its output is a feature vector "
                f"{tuple(feature_shape)}; a conv head needs a feature map, use 'pool-linear'"
            )
        return nn.Sequential(nn.Flatten(), nn.Linear(feature_shape[0], num_classes))
    c = feature_shape[0]
    if kind == "pool-linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    width = channels or 2 * c
    return nn.Sequential(
        nn.Conv2d(c, width, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


class _AllLeft(BaseException):  # noqa: N818 - control flow, not an error
    """Raised inside the backbone when no sample is left (BaseException: a user's
    ``except Exception`` in a forward must not swallow it)."""


class _Run:
    """State of one early-exit forward pass (lives only during :meth:`EarlyExitNet.predict`)."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.remaining = torch.arange(batch, device=device)  # original indices still in flight
        self.exit_index = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.batch = batch
        self.fired: list[int] = []

    def store(self, rows: torch.Tensor, logits: torch.Tensor, exit_i: int) -> None:
        if self.logits is None:
            self.logits = logits.new_empty(self.batch, logits.shape[1])
        elif logits.shape[1] != self.logits.shape[1]:
            raise RuntimeError(
                f"exit {exit_i} gives {logits.shape[1]} classes but an earlier exit gave "
                f"{self.logits.shape[1]}"
            )
        self.logits[rows] = logits.to(self.logits.dtype)
        self.exit_index[rows] = exit_i


@register_module
class EarlyExitNet(ConditionalModel):
    """A model with exit heads after some of its submodules (see the module docstring).

    ``forward`` in training mode returns the list of every exit's logits, the backbone's own
    output last (BranchyNet's joint loss needs all of them: see
    :func:`~nncompress.conditional.train.exit_loss`); in eval mode it returns ``(B, K)``
    logits, each sample's from the exit it left at (:meth:`predict` also says which exit).
    :meth:`forward_all` always returns the list.

    Parameters
    ----------
    backbone : the original model (held, not copied).
    after : submodule names of the exit points, in forward order.
    heads : one head per exit point (a ``ModuleList``).
    thresholds : per exit, in [0, 1]; 1.0 (the default) closes an exit.
    confidence : ``"max-softmax"`` or ``"entropy"``.
    exit_rates : fractions of held-out samples leaving at each exit and at the end (``E + 1``
        values), recorded by calibration; :meth:`expected_macs` uses them.
    """

    spec_wraps = "backbone"  # engine.modspec: the child holding the wrapped model

    def __init__(
        self,
        backbone: nn.Module,
        after: Sequence[str],
        heads: nn.ModuleList | Sequence[nn.Module],
        thresholds: Sequence[float] | None = None,
        confidence: str = "max-softmax",
        exit_rates: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads if isinstance(heads, nn.ModuleList) else nn.ModuleList(heads)
        self.after = tuple(after)
        if len(self.heads) != len(self.after):
            raise ConfigError(
                f"heads: {len(self.heads)} given for {len(self.after)} exit points {self.after}"
            )
        self._points()  # every exit point must exist
        self._init_exits(len(self.heads), thresholds, confidence, exit_rates)
        self._frozen_backbone = False

    def _points(self) -> list[nn.Module]:
        """The backbone modules the exits follow (looked up on every call, so a transform that
        replaces a submodule inside them is picked up)."""
        points = []
        for name in self.after:
            try:
                points.append(self.backbone.get_submodule(name))
            except AttributeError:
                names = [n for n, _ in self.backbone.named_children()]
                raise ConfigError(
                    f"after: exit point {name!r} is not a submodule of the model "
                    f"(its top-level children are {names})"
                ) from None
        return points

    def spec_kwargs(self) -> dict:
        return {
            "after": list(self.after),
            "thresholds": list(self.thresholds),
            "confidence": self.confidence,
            "exit_rates": list(self.exit_rates) if self.exit_rates is not None else None,
        }

    @property
    def backbone_frozen(self) -> bool:
        """Whether :meth:`freeze_backbone_` holds the backbone in eval mode."""
        return self._frozen_backbone

    def freeze_backbone_(self, frozen: bool = True) -> EarlyExitNet:
        """Freeze (or unfreeze) the backbone: no gradients, and kept in eval mode (BatchNorm
        statistics fixed) even when the net is put in training mode. For heads-only training."""
        self._frozen_backbone = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> EarlyExitNet:
        super().train(mode)
        if self._frozen_backbone:
            self.backbone.eval()
        return self

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits on the whole batch, the backbone's output last: ``E + 1`` tensors
        ``(B, K)``. Closed exits are computed too (training and calibration need them)."""
        outs: list[torch.Tensor | None] = [None] * self.num_exits
        handles = []

        def hook_for(i: int):
            def hook(mod: nn.Module, inputs, out: torch.Tensor) -> None:
                if outs[i] is not None:
                    raise RuntimeError(
                        f"exit point {self.after[i]!r} ran twice in one forward pass; an exit "
                        "must follow a module that runs once"
                    )
                outs[i] = self.heads[i](out)

            return hook

        try:
            for i, m in enumerate(self._points()):
                handles.append(m.register_forward_hook(hook_for(i)))
            final = self.backbone(x)
        finally:
            for h in handles:
                h.remove()
        missing = [self.after[i] for i, o in enumerate(outs) if o is None]
        if missing:
            raise RuntimeError(f"exit points {missing} did not run in the forward pass")
        return [*outs, final]

    def predict(self, x: torch.Tensor) -> ExitPrediction:
        """Early-exit inference: per sample, the logits of the first exit whose confidence
        reaches its threshold (else the backbone's output), and that exit's index.

        Samples that left are dropped from the batch the exit point returns, so later blocks
        compute only the rest; when no sample is left the backbone's forward is stopped.
        """
        run = _Run(x.shape[0], x.device)
        handles = []

        def hook_for(i: int):
            t = self.thresholds[i]

            def hook(mod: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor | None:
                run.fired.append(i)
                if t >= 1.0:  # closed: the head does not run
                    return None
                logits = self.heads[i](out)  # (b, K)
                leave = confidence(logits, self.confidence) >= t  # (b,)
                if not bool(leave.any()):
                    return None
                run.store(run.remaining[leave], logits[leave], i)
                stay = ~leave
                run.remaining = run.remaining[stay]
                if run.remaining.numel() == 0:
                    raise _AllLeft
                return out[stay]

            return hook

        try:
            for i, m in enumerate(self._points()):
                handles.append(m.register_forward_hook(hook_for(i)))
            try:
                final = self.backbone(x)
            except _AllLeft:
                final = None
        finally:
            for h in handles:
                h.remove()
        if final is not None:
            if not isinstance(final, torch.Tensor) or final.shape[0] != run.remaining.numel():
                shape = tuple(final.shape) if isinstance(final, torch.Tensor) else type(final)
                raise RuntimeError(
                    f"the backbone returned {shape} for {run.remaining.numel()} samples still "
                    f"in flight: an exit point in {self.after} does not cut the forward pass"
                )
            if run.logits is None:  # nobody left early: the backbone's output is the answer
                return ExitPrediction(final, torch.full_like(run.exit_index, self.num_exits))
            run.store(run.remaining, final, self.num_exits)
        assert run.logits is not None
        return ExitPrediction(run.logits, run.exit_index)

    def exit_costs(self, input_shape: Sequence[int]):
        """MACs of the backbone up to each exit point, of each head, and of the whole backbone
        for one sample of ``input_shape`` (:func:`~nncompress.conditional.cost.exit_costs`)."""
        from .cost import exit_costs

        return exit_costs(self, input_shape)


def _probe_features(
    model: nn.Module, after: Sequence[str], input_shape: Sequence[int]
) -> tuple[list[tuple[int, ...]], int, list[int]]:
    """Run a probe batch: the feature shape of every exit point (one sample), the class count
    and the order in which the exit points ran."""
    points = {}
    for name in after:
        try:
            points[name] = model.get_submodule(name)
        except AttributeError:
            names = [n for n, _ in model.named_children()]
            raise ConfigError(
                f"after: exit point {name!r} is not a submodule of the model "
                f"(its top-level children are {names})"
            ) from None
    seen: dict[str, list] = {name: [] for name in after}
    order: list[str] = []
    handles = []

    def hook_for(name: str):
        def hook(mod, inputs, out) -> None:
            seen[name].append(out)
            order.append(name)

        return hook

    batch = 4
    x = torch.randn(batch, *input_shape, device=model_device(model))
    was_training = model.training
    model.eval()
    try:
        for name, m in points.items():
            handles.append(m.register_forward_hook(hook_for(name)))
        with torch.no_grad():
            final = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not isinstance(final, torch.Tensor) or final.dim() != 2 or final.shape[0] != batch:
        got = tuple(final.shape) if isinstance(final, torch.Tensor) else type(final).__name__
        raise ConfigError(f"the model must return (batch, classes) logits; it returned {got}")
    shapes = []
    for name in after:
        outs = seen[name]
        if len(outs) != 1:
            raise ConfigError(
                f"after: exit point {name!r} runs {len(outs)} times per forward pass; an exit "
                "must follow a module that runs exactly once (not a shared activation)"
            )
        out = outs[0]
        if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4) or out.shape[0] != batch:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"after: exit point {name!r} outputs {got}; an exit needs a feature map "
                "(batch, C, H, W) or a feature vector (batch, F)"
            )
        shapes.append(tuple(out.shape[1:]))
    ran = [after.index(n) for n in order]
    return shapes, int(final.shape[1]), ran


def _check_cut(net: EarlyExitNet, input_shape: Sequence[int]) -> None:
    """Check that dropping samples at each exit point leaves the others' outputs unchanged."""
    x = torch.randn(4, *input_shape, device=model_device(net))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            full = net.backbone(x)
            for i, name in enumerate(net.after):
                point = net._points()[i]
                handle = point.register_forward_hook(lambda m, inp, out: out[1:])
                try:
                    part = net.backbone(x)
                except RuntimeError as exc:
                    raise ConfigError(
                        f"after: exit point {name!r} does not cut the forward pass (dropping "
                        f"samples there breaks the rest of the model: {exc}); attach exits after "
                        "whole blocks, not inside a residual block or before a skip connection"
                    ) from None
                finally:
                    handle.remove()
                if part.shape != full[1:].shape or not torch.allclose(
                    part, full[1:], rtol=1e-4, atol=1e-5
                ):
                    raise ConfigError(
                        f"after: exit point {name!r} does not cut the forward pass (the rest of "
                        "the model uses tensors computed before it, so samples cannot leave "
                        "there); attach exits after whole blocks"
                    )
    finally:
        net.train(was_training)


def attach_exits_(
    model: nn.Module, config: ExitConfig, *, input_shape: Sequence[int]
) -> EarlyExitNet:
    """Attach exit heads after the submodules ``config.after`` of ``model``.

    ``model`` is used in place (not copied) as the returned net's ``backbone``, so joint
    training changes its weights; its structure is untouched. ``input_shape`` (one sample, e.g.
    ``(1, 28, 28)``) sizes the heads: a probe batch checks that every exit point exists, runs
    once per forward pass, outputs a feature map or vector, appears in ``after`` in forward
    order, and cuts the forward pass (samples can be dropped there). Heads are created on the
    model's device.
    """
    if not isinstance(config, ExitConfig):
        raise ConfigError(f"config: expected an ExitConfig, got {type(config).__name__}")
    if isinstance(model, EarlyExitNet):
        raise ConfigError("model already has exits; attach them to its .backbone instead")
    shapes, num_classes, ran = _probe_features(model, config.after, input_shape)
    if ran != sorted(ran):
        in_order = [config.after[i] for i in ran]
        raise ConfigError(
            f"after={list(config.after)}: must be listed in the order the forward pass runs "
            f"them: {in_order}"
        )
    heads = [
        make_head(
            shape,
            num_classes,
            config.head,
            channels=config.head_channels,
            stride=config.head_stride,
            where=name,
        )
        for name, shape in zip(config.after, shapes, strict=True)
    ]
    device = model_device(model)
    net = EarlyExitNet(
        model,
        config.after,
        nn.ModuleList(heads).to(device),
        thresholds=config.thresholds,
        confidence=config.confidence,
    )
    net.train(model.training)
    _check_cut(net, input_shape)
    log.info(
        "attached %d exits after %s (%s heads, %d classes)",
        net.num_exits,
        list(config.after),
        config.head,
        num_classes,
    )
    return net
