"""Trained quantization by weight sharing (Han et al., ICLR 2016, "Deep Compression", stage 2).

Per layer, the surviving (nonzero / unmasked) weights are clustered with 1-D k-means into
``k = 2**b`` shared values; each weight then stores a ``b``-bit index into its layer's codebook.
Zero is not a cluster: pruned weights stay exactly zero (the mask wins).

Three API layers (the first two in :mod:`.lloyd`, re-exported here):

1. :func:`kmeans_1d` — exact 1-D Lloyd iterations on a tensor.
2. :class:`KMeansQuantizer` — the same as a scikit-learn style estimator
   (``fit`` returns self; ``codebook_``, ``labels_``, ``inertia_``).
3. :func:`share_weights_` — a model transform: installs a
   ``torch.nn.utils.parametrize`` parametrization ``weight = codebook[indices] * mask`` on
   every selected layer. The indices are a fixed buffer and the codebook an ``nn.Parameter``,
   so autograd gives each centroid the *sum* of the gradients of the weights assigned to it,
   which is exactly Deep Compression's centroid update; any optimizer then fine-tunes it.
   :func:`share_from_values_` rebuilds that parametrization from a model whose (plain) weights
   already take few distinct values, e.g. one reloaded from a checkpoint.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.coverage import CoverageReport, coverage_report
from ..core.errors import ConfigError
from ..core.policy import Policy
from ..core.progress import Progress, progress_task
from ..core.select import LayerSelector, Selectable
from ..core.validate import check as _check
from .lloyd import INITS as INITS
from .lloyd import KMeansQuantizer as KMeansQuantizer
from .lloyd import _init_centroids as _init_centroids
from .lloyd import kmeans_1d as kmeans_1d
from .lloyd import sharing_compression_rate as sharing_compression_rate

__all__ = [
    "INITS",
    "KMeansConfig",
    "KMeansQuantizer",
    "LayerShareReport",
    "ShareReport",
    "SharedWeight",
    "kmeans_1d",
    "share_from_values_",
    "share_weights_",
    "shared_layers",
    "sharing_compression_rate",
]

log = logging.getLogger(__name__)

CENTROID_GRADS = ("mean", "sum")
MAX_BITS = 16
REBUILD_MAX_VALUES = 2**8  # share_from_values_: layers with at most this many distinct values

#: what ``filter=`` accepts (a LayerSelector, a predicate, names/globs): kept for old imports
LayerFilter = Selectable
#: the layer types weight sharing applies to
SHAREABLE = LayerSelector(fn=lambda name, m: _shareable(m))


# --------------------------------------------------------------------------------------------
# Layer 3: model transform (layers 1 and 2: .lloyd)
# --------------------------------------------------------------------------------------------


def _valid_bits(b: Any) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= MAX_BITS


@dataclass(frozen=True)
class KMeansConfig:
    """How to share weights: bits per layer type, per-layer overrides, k-means settings.

    Defaults follow Deep Compression: 8 bits (256 shared values) for conv layers, 5 bits (32)
    for fully connected layers (Linear and Hugging Face Conv1D); ``bits_embedding`` for
    ``nn.Embedding`` tables. ``per_layer`` maps a module name (``'fc1'``) or an fnmatch pattern
    (``'encoder.*.query'``) to its bits: an exact name wins, then the first matching pattern.
    Bits go up to 16 (65,536 shared values).
    """

    bits_conv: int = 8
    bits_fc: int = 5
    per_layer: dict[str, int] = field(default_factory=dict)
    bits_embedding: int = 8
    init: str = "linear"
    max_iter: int = 300
    seed: int = 0
    centroid_grad: str = "mean"

    def __post_init__(self) -> None:
        _check(
            _valid_bits(self.bits_conv), "bits_conv", self.bits_conv, f"must be in [1, {MAX_BITS}]"
        )
        _check(_valid_bits(self.bits_fc), "bits_fc", self.bits_fc, f"must be in [1, {MAX_BITS}]")
        _check(
            _valid_bits(self.bits_embedding),
            "bits_embedding",
            self.bits_embedding,
            f"must be in [1, {MAX_BITS}]",
        )
        _check(isinstance(self.per_layer, dict), "per_layer", self.per_layer, "must be a mapping")
        for name, b in self.per_layer.items():
            _check(
                _valid_bits(b),
                f"per_layer['{name}']",
                b,
                f"bits must be an integer in [1, {MAX_BITS}]",
            )
        _check(self.init in INITS, "init", self.init, f"must be one of {INITS}")
        _check(
            self.centroid_grad in CENTROID_GRADS,
            "centroid_grad",
            self.centroid_grad,
            f"must be one of {CENTROID_GRADS} ('sum' is the paper's rule, 'mean' divides it "
            "by the cluster size)",
        )
        _check(
            isinstance(self.max_iter, int) and self.max_iter >= 1,
            "max_iter",
            self.max_iter,
            "must be an integer >= 1",
        )

    @classmethod
    def from_policy(cls, policy: Policy) -> KMeansConfig:
        """``per_layer`` bits of a :class:`~nncompress.core.Policy` (a searched policy)."""
        if not policy.bits:
            raise ConfigError("policy.bits is empty: this policy shares no weights")
        return cls(per_layer=dict(policy.bits))

    def bits_for(self, name: str, module: nn.Module) -> int:
        if name in self.per_layer:
            return self.per_layer[name]
        for pattern, b in self.per_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                return b
        base = _type_before(module)
        if issubclass(base, nn.Embedding):
            return self.bits_embedding
        return self.bits_conv if issubclass(base, nn.modules.conv._ConvNd) else self.bits_fc


class SharedWeight(nn.Module):
    """Parametrization ``weight = where(mask, codebook[indices], 0)``.

    ``codebook`` ``(k,)`` is a trainable parameter; ``indices`` (int64, the weight's shape) and
    ``mask`` (bool) are fixed buffers. Indexing a parameter back-propagates by scatter-add, so
    with ``centroid_grad='sum'`` ``codebook.grad[j] = sum of dL/dW over the unmasked weights
    with index j`` — Deep Compression's centroid gradient, literally. With ``'mean'`` (the
    default) the gradient is divided by the cluster size, i.e. the average of the weights'
    gradients (as Stock et al. 2019 update codewords): the summed step is ~1000x a weight's step
    for clusters of ~1000 weights and made SGD diverge when fine-tuning LeNet-5's centroids at
    the weights' learning rate (91.84% -> 32.04%, benchmarks/deep_compression.py). The forward
    value is identical in both modes. ``torch.where`` (not a product) keeps pruned entries +0.0.
    The input (the previous value of the weight) is ignored.
    """

    def __init__(
        self,
        codebook: torch.Tensor,
        indices: torch.Tensor,
        mask: torch.Tensor,
        centroid_grad: str = "mean",
    ) -> None:
        super().__init__()
        if indices.shape != mask.shape:
            raise ValueError(f"indices {tuple(indices.shape)} and mask {tuple(mask.shape)} differ")
        if centroid_grad not in CENTROID_GRADS:
            raise ValueError(f"centroid_grad={centroid_grad!r}: must be one of {CENTROID_GRADS}")
        self.centroid_grad = centroid_grad
        self.codebook = nn.Parameter(codebook.detach().clone())  # (k,)
        self.register_buffer("indices", indices.detach().to(torch.int64).clone())  # weight shape
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())  # weight shape

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        codebook = self.codebook  # (k,)
        if self.centroid_grad == "mean" and codebook.requires_grad:
            counts = torch.bincount(self.indices[self.mask], minlength=codebook.numel())  # (k,)
            scale = 1.0 / counts.clamp(min=1).to(codebook.dtype)  # (k,)
            # value exactly codebook (x + 0 == x); gradient scaled by 1 / cluster size
            codebook = codebook.detach() + (codebook - codebook.detach()) * scale
        shared = codebook[self.indices]  # (weight shape)
        return torch.where(self.mask, shared, torch.zeros((), dtype=shared.dtype))

    @property
    def k(self) -> int:
        return int(self.codebook.numel())

    def storage_hint(self) -> dict[str, Any]:
        """For :func:`nncompress.io.save_compressed`: at most ``k`` distinct values, so the
        codebook scheme applies even above its default 256-value limit."""
        return {"scheme": "codebook", "k": self.k}


@dataclass
class LayerShareReport:
    """What :func:`share_weights_` did to one layer."""

    name: str
    n_weights: int
    n_nonzero: int
    bits: int
    k: int
    inertia: float
    compression_rate: float  # r of eq. 2 for the surviving weights (fp32 originals)

    @classmethod
    def of(
        cls, name: str, n_weights: int, nnz: int, bits: int, k: int, inertia: float
    ) -> LayerShareReport:
        """The report of a layer whose ``nnz`` surviving weights now take ``k`` values."""
        rate = sharing_compression_rate(max(nnz, 1), k)
        return cls(name, n_weights, nnz, bits, k, inertia, rate)


@dataclass
class ShareReport:
    layers: list[LayerShareReport] = field(default_factory=list)
    coverage: CoverageReport | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": [vars(r) for r in self.layers]}
        if self.coverage is not None:
            out["coverage"] = self.coverage.to_dict()
        return out


def _shareable(m: nn.Module) -> bool:
    """Linear, Conv, Embedding, or a Hugging Face Conv1D (recognised without importing it)."""
    base = _type_before(m)
    if issubclass(base, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
        return True
    return base.__name__ == "Conv1D" and hasattr(m, "nf")


def _type_before(m: nn.Module) -> type:
    return parametrize.type_before_parametrizations(m)


def _candidates(model: nn.Module, filter: Selectable) -> list[tuple[str, nn.Module]]:
    return list((SHAREABLE & filter).select(model).items())


def shared_layers(model: nn.Module) -> dict[str, SharedWeight]:
    """The :class:`SharedWeight` parametrization of every shared layer, by module name."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations["weight"]:
                if isinstance(p, SharedWeight):
                    out[name] = p
    return out


def _install(
    module: nn.Module,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor,
    centroid_grad: str = "mean",
):
    p = SharedWeight(codebook.to(module.weight.dtype), indices, mask, centroid_grad)
    p = p.to(module.weight.device)
    # Composes after any existing parametrization (e.g. a pruning mask): mask, then codebook.
    parametrize.register_parametrization(module, "weight", p)
    # The stored original no longer influences the output: keep it out of training.
    module.parametrizations["weight"].original.requires_grad_(False)
    return p


def _share_layer(
    name: str, m: nn.Module, cfg: KMeansConfig, bits: int
) -> tuple[LayerShareReport, SharedWeight]:
    """Cluster one layer's surviving weights and install its :class:`SharedWeight`."""
    with torch.no_grad():
        w = m.weight.detach()  # effective weight (after any pruning mask)
    mask = w != 0  # the mask wins: zeros are pruned, not a cluster
    survivors = w[mask]  # (nnz,)
    k = 2**bits
    if survivors.numel() == 0:
        codebook = torch.zeros(k, dtype=w.dtype)
        indices = torch.zeros_like(w, dtype=torch.int64)
        inertia = 0.0
    else:
        q = KMeansQuantizer(bits, cfg.init, cfg.max_iter, random_state=cfg.seed)
        q.fit(survivors)
        codebook = q.codebook_
        indices = torch.zeros(w.shape, dtype=torch.int64)
        indices[mask.cpu()] = q.labels_
        inertia = q.inertia_
    p = _install(m, codebook, indices, mask, cfg.centroid_grad)
    nnz = int(mask.sum())
    log.info("shared %s: %d weights -> %d values (%d bits)", name, nnz, k, bits)
    return LayerShareReport.of(name, w.numel(), nnz, bits, k, inertia), p


def share_weights_(
    model: nn.Module,
    config: KMeansConfig | Policy | None = None,
    *,
    filter: Selectable = None,  # noqa: A002 - torchao-style keyword
    progress: Progress | None = None,
) -> ShareReport:
    """Replace the weights of each selected layer by shared values, in place.

    Per layer (Han et al. 2016, section 3): the surviving weights ``W[W != 0]`` are clustered
    by :func:`kmeans_1d` into ``k = 2**b`` centroids (``b`` from ``config``); a
    :class:`SharedWeight` parametrization then computes ``weight = codebook[indices] * mask``.
    Pruned (zero) weights are not clustered and stay exactly zero. Layers already shared are
    skipped. Fine-tune afterwards (e.g. :func:`nncompress.engine.finetune`): only the codebooks,
    biases and other unshared parameters remain trainable.

    Parameters
    ----------
    config : :class:`KMeansConfig`, or a :class:`~nncompress.core.Policy` (its per-layer bits,
        e.g. from a policy search; only the layers it names are shared).
    filter : which layers (a :class:`~nncompress.core.LayerSelector`, a predicate
        ``(name, module) -> bool`` or names/globs), among the Linear, Conv, Embedding and
        Hugging Face Conv1D layers (default: all). Layers sharing one weight (tied) share one
        codebook.
    """
    if isinstance(config, Policy):
        config = KMeansConfig.from_policy(config)
        filter = LayerSelector(names=sorted(config.per_layer)) & filter
    cfg = config or KMeansConfig()
    layers = _candidates(model, filter)
    names = {n for n, _ in layers}
    unknown = sorted(
        k
        for k in cfg.per_layer
        if k not in names and not any(fnmatch.fnmatchcase(n, k) for n in names)
    )
    if unknown:
        raise ConfigError(
            f"per_layer names {unknown} are not shareable layers of the model (nor patterns "
            f"matching one); allowed: {sorted(names)}"
        )
    tied = _tied_with(layers)
    by_name = dict(layers)
    tied_bits: dict[str, int] = {}
    for name, others in tied.items():
        if others:
            tied_bits[name] = _tied_group_bits(cfg, [name, *others], by_name)
    already = shared_layers(model)
    tied_done: dict[str, str] = {}
    report = ShareReport()
    with progress_task(progress, "share", len(layers)) as task:
        for i, (name, m) in enumerate(layers):
            if name in already:
                log.info("layer %s is already shared: skipped", name)
                continue
            twin = next((o for o in tied.get(name, []) if o in already), None)
            if twin is not None:  # tied to a layer shared a moment ago: same parametrization
                _install_same(m, already[twin])
                already[name] = already[twin]
                tied_done[name] = twin
                log.info("layer %s is tied to %s: shares its codebook", name, twin)
                continue
            bits = tied_bits.get(name) or cfg.bits_for(name, m)
            rep, already[name] = _share_layer(name, m, cfg, bits)
            report.layers.append(rep)
            task.advance(i + 1, layer=name)
    changed = {r.name: f"{r.bits} bits" for r in report.layers}
    changed.update({n: f"tied to {t}" for n, t in tied_done.items()})
    skipped = {
        n: "not selected by the layer filter"
        for n, m in model.named_modules()
        if n and _shareable(m) and n not in names
    }
    skipped.update({n: "already shared" for n in names if n not in changed})
    report.coverage = coverage_report("share", model, changed, skipped)
    report.coverage.warn()
    return report


def _tied_with(layers: list[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """For each layer whose weight tensor another selected layer also holds (a tied embedding
    and LM head), the names of those other layers."""
    by_id: dict[int, list[str]] = {}
    for name, m in layers:
        w = (
            m.parametrizations["weight"].original
            if parametrize.is_parametrized(m, "weight")
            else m.weight
        )
        by_id.setdefault(id(w), []).append(name)
    return {n: [o for o in group if o != n] for group in by_id.values() for n in group}


def _tied_group_bits(cfg: KMeansConfig, names: list[str], modules: dict) -> int:
    """Bits of layers sharing one weight: their explicit per_layer bits (which must agree),
    else ``bits_embedding`` when one of them is an embedding, else the first one's default."""
    explicit = set()
    for n in names:
        if n in cfg.per_layer:
            explicit.add(cfg.per_layer[n])
        else:
            hit = next((b for p, b in cfg.per_layer.items() if fnmatch.fnmatchcase(n, p)), None)
            if hit is not None:
                explicit.add(hit)
    if len(explicit) > 1:
        raise ConfigError(
            f"layers {names} share one weight (tied) but per_layer gives them different bits "
            f"{sorted(explicit)}; give them the same bits"
        )
    if explicit:
        return explicit.pop()
    if any(issubclass(_type_before(modules[n]), nn.Embedding) for n in names):
        return cfg.bits_embedding
    return cfg.bits_for(names[0], modules[names[0]])


def _install_same(module: nn.Module, p: SharedWeight) -> None:
    """Register an existing :class:`SharedWeight` on ``module`` too (tied weights stay tied)."""
    parametrize.register_parametrization(module, "weight", p)
    module.parametrizations["weight"].original.requires_grad_(False)


def share_from_values_(
    model: nn.Module,
    *,
    max_values: int = REBUILD_MAX_VALUES,
    filter: Selectable = None,  # noqa: A002
    centroid_grad: str = "mean",
) -> list[str]:
    """Rebuild the shared-weight parametrization from weights that take few distinct values.

    Checkpoints fold parametrizations into plain weights; a layer whose nonzero weights take at
    most ``max_values`` distinct values is turned back into ``codebook[indices] * mask`` with
    the codebook = those values (ascending) and the mask = nonzeros. The effective weights are
    unchanged bit for bit. Layers already shared, or with more distinct values, are left alone.
    Returns the names of the layers that were rebuilt.
    """
    already = shared_layers(model)
    done = []
    for name, m in _candidates(model, filter):
        if name in already:
            continue
        with torch.no_grad():
            w = m.weight.detach()
        mask = w != 0
        values, inverse = torch.unique(w[mask], sorted=True, return_inverse=True)
        if values.numel() == 0 or values.numel() > max_values:
            continue
        indices = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
        indices[mask] = inverse
        _install(m, values, indices, mask, centroid_grad)
        done.append(name)
    return done
