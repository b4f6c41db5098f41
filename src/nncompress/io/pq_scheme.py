"""The ``pq`` scheme of the ``.ncz`` container: product-quantized tensors (Stock et al. 2020).

A tensor whose C-order flattening, cut into consecutive subvectors of ``d`` values, takes few
distinct subvectors is stored as a codebook of those subvectors (``k x d`` values) plus one
code per subvector (``log2 k`` bits fixed-width, or entropy-coded when that is smaller). An
all-zero subvector (a pruned block) uses the reserved code ``k`` and costs no codebook entry.
For a :class:`~nncompress.quant.pq.PQWeight` layer (rows of ``C_in/groups * k_h * k_w``
values cut into blocks of ``d``) the stored subvectors are exactly the layer's blocks.

Nothing here reads or writes the container itself: these are the array-level halves of the
encoder and the decoder, which ``container.py`` frames, codes and validates (see
docs/format.md, scheme ``pq``). Like the ``codebook`` scheme, -0.0 counts as zero: a block of
(+/-) zeros decodes to +0.0.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DEFAULT_BLOCK_SIZES",
    "PQ_MAX_D",
    "PQ_MAX_K",
    "find_subvector_codebook",
    "fp16_exact",
    "pq_table",
]

PQ_MAX_K = 1 << 16  # codewords per tensor
PQ_MAX_D = 1 << 12  # values per subvector
DEFAULT_BLOCK_SIZES = (4, 8, 9, 16, 18)  # Stock et al.'s small / large blocks
_SAMPLE = 8192  # subvectors looked at before deciding a tensor is not product-quantized
_UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float16): np.uint16}


def fp16_exact(values: np.ndarray) -> bool:
    """Whether every value survives float -> float16 -> float bit for bit (NaN payloads too)."""
    utype = _UINT[values.dtype]
    with np.errstate(over="ignore"):
        back = values.astype(np.float16).astype(values.dtype)
    return bool(np.array_equal(back.view(utype), values.view(utype)))


def _row_keys(bits: np.ndarray) -> np.ndarray:
    """Each row of an unsigned-integer ``(n, d)`` array as one opaque ``np.void`` key."""
    bits = np.ascontiguousarray(bits)
    return bits.view(np.dtype((np.void, bits.itemsize * bits.shape[1]))).ravel()  # (n,)


def find_subvector_codebook(
    arr: np.ndarray, d: int, *, fp16: bool = False, give_up_early: bool = True
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The distinct nonzero ``d``-subvectors of ``arr`` and each subvector's code.

    Parameters
    ----------
    arr : float32 or float16 array; its size must be a multiple of ``d``.
    fp16 : round the values to float16 first (the ``codebook_dtype='fp16'`` option).
    give_up_early : return ``None`` when the first 8192 subvectors are mostly distinct (a
        dense tensor, which this scheme cannot shrink) without sorting the whole tensor.

    Returns
    -------
    ``(codebook, codes, zero)`` or ``None`` (more than 65536 distinct subvectors, or every
    subvector zero): ``codebook`` ``(k, d)`` in ``arr``'s dtype, ordered by bit pattern;
    ``codes`` ``(numel / d,)`` int64 in ``[0, k]``; ``zero`` whether code ``k`` (all-zero
    block) occurs.
    """
    ftype = arr.dtype
    utype = _UINT[ftype]
    v = arr.astype(np.float16).astype(ftype) if fp16 else arr
    bits = np.ascontiguousarray(v).view(utype).reshape(-1, d)  # (n, d)
    sign = utype(1 << (8 * bits.itemsize - 1))
    is_zero = ((bits & ~sign) == 0).all(axis=1)  # (n,): +0.0 and -0.0 blocks
    n = bits.shape[0]
    if give_up_early and n > 16:
        head = bits[:_SAMPLE]
        if np.unique(_row_keys(head)).size > head.shape[0] // 2:
            return None
    nz = bits[~is_zero]  # (n_nonzero_blocks, d)
    if nz.shape[0] == 0:
        return None
    uniq, inv = np.unique(_row_keys(nz), return_inverse=True)
    k = int(uniq.size)
    if k > PQ_MAX_K:
        return None
    codebook = np.frombuffer(uniq.tobytes(), dtype=utype).reshape(k, d).view(ftype)  # (k, d)
    zero = bool(is_zero.any())
    codes = np.full(n, k, dtype=np.int64)  # (n,)
    codes[~is_zero] = inv.reshape(-1)
    return codebook.copy(), codes, zero


def pq_table(codebook: np.ndarray, zero: bool) -> np.ndarray:
    """The decoding table ``(k + zero, d)``: the codebook, then an all-zero row if ``zero``."""
    if not zero:
        return codebook
    return np.concatenate([codebook, np.zeros((1, codebook.shape[1]), codebook.dtype)])
