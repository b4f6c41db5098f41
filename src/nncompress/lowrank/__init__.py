"""Low-rank decomposition of Linear and Conv layers (SPEC section 4).

Layer 1, tensor functions: :func:`truncated_svd`, :func:`tucker2`, :func:`cp_decompose`,
:func:`evbmf`, :func:`rank_for_energy`; layer builders: :func:`svd_linear`,
:func:`separable_conv`, :func:`tucker2_conv`, :func:`cp_conv`, :func:`tt_linear`,
:func:`tt_conv` (:class:`TTLinear`, :class:`TTConv2d`); model transform: :func:`decompose_`
with :class:`DecomposeConfig`; data-aware refit of the decomposed layers on real activations:
:func:`refit_`; data-aware (whitened, SVD-LLM) SVD of Linear / HF Conv1D layers:
:func:`decompose_whitened_`.
"""

from .cp import cp_conv, cp_decompose
from .rank import EVBMFResult, evbmf, rank_for_energy
from .refit import RefitResult, refit_
from .separable import separable_conv
from .svd import svd_conv1x1, svd_linear, truncated_svd
from .transform import (
    METHODS,
    DecomposeConfig,
    DecomposeReport,
    LayerDecomposition,
    decompose_,
)
from .tt import TTConv2d, TTLinear, factorize, tt_conv, tt_linear
from .tucker import tucker2, tucker2_conv, tucker2_vbmf_ranks
from .whiten import LayerWhitenedSVD, WhitenedSVDConfig, decompose_whitened_, whitened_svd

__all__ = [
    "LayerWhitenedSVD",
    "WhitenedSVDConfig",
    "decompose_whitened_",
    "whitened_svd",
    "METHODS",
    "DecomposeConfig",
    "DecomposeReport",
    "EVBMFResult",
    "LayerDecomposition",
    "RefitResult",
    "TTConv2d",
    "TTLinear",
    "cp_conv",
    "cp_decompose",
    "decompose_",
    "evbmf",
    "factorize",
    "rank_for_energy",
    "refit_",
    "separable_conv",
    "svd_conv1x1",
    "svd_linear",
    "truncated_svd",
    "tt_conv",
    "tt_linear",
    "tucker2",
    "tucker2_conv",
    "tucker2_vbmf_ranks",
]
