"""Calibration and evaluation text: a plain-text file or folder, one example per line,
tokenised with the model folder's own tokenizer (offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError

__all__ = ["read_text_lines", "text_batches", "tokenized_batches"]


def read_text_lines(path: str | Path, max_examples: int | None = None) -> list[str]:
    """Non-empty stripped lines of a text file, or of every regular file of a folder (sorted by
    name, undecodable bytes replaced). Raises ConfigError when there are none."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    elif p.is_file():
        files = [p]
    else:
        raise ConfigError(f"text '{p}': no such file or folder")
    lines: list[str] = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    lines.append(line)
                    if max_examples is not None and len(lines) >= max_examples:
                        return lines
    if not lines:
        raise ConfigError(f"text '{p}': holds no non-empty line")
    return lines


def tokenized_batches(
    lines: list[str], tokenizer: Any, batch_size: int = 8, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """``{"input_ids", "attention_mask"}`` batches (padded to the longest line of each batch,
    truncated at ``max_length``). A tokenizer without a padding token pads with its end token
    (masked out)."""
    if batch_size < 1 or max_length < 1:
        raise ConfigError(f"batch_size={batch_size}, max_length={max_length}: must be >= 1")
    pad = tokenizer.pad_token
    if pad is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a padding nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        out = []
        for i in range(0, len(lines), batch_size):
            enc = tokenizer(
                lines[i : i + batch_size],
                padding="longest",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out
    finally:
        tokenizer.pad_token = pad


def text_batches(
    path: str | Path,
    hf_folder: str | Path,
    *,
    batch_size: int = 8,
    max_length: int = 128,
    max_examples: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Batches of the text at ``path`` tokenised with ``hf_folder``'s tokenizer (offline)."""
    from ..io.hf import _transformers

    tf = _transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(
            str(hf_folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"'{hf_folder}': no usable tokenizer files ({exc})") from exc
    return tokenized_batches(read_text_lines(path, max_examples), tok, batch_size, max_length)
