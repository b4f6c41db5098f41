"""Hugging Face model folders in and out (``config.json`` + ``model.safetensors``), offline only.

``transformers`` is an optional dependency (``pip install nncompress[hf]``); it is imported
when one of these functions runs. Loading never touches the network (``HF_HUB_OFFLINE`` and
``local_files_only``) and never runs code from the folder (``trust_remote_code=False``): the
architecture named in ``config.json`` must be one of the classes the ``transformers`` auto
classes listed in :data:`AUTO_CLASSES` map the config to, an explicit registry rather than a
lookup of arbitrary names.

A ``.ncz`` written from a Hugging Face model keeps, in its metadata under ``"hf"``, the model's
``config.json`` contents, its architecture name and the structural replacements made by
transforms that change modules (whitened SVD's factor pairs, as
:func:`nncompress.engine.modspec.diff_modules` records them), so
:func:`model_from_hf_metadata` rebuilds the model from the file alone and
:func:`decode_to_hf_folder` writes a folder ``AutoModel.from_pretrained`` loads (factorised
layers multiplied back into one matrix there, since the Hugging Face class expects it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import folded_copy

__all__ = [
    "AUTO_CLASSES",
    "HF_KEY",
    "TOKENIZER_FILES",
    "decode_to_hf_folder",
    "hf_metadata",
    "is_hf_folder",
    "load_hf_folder",
    "model_from_hf_metadata",
    "save_hf_folder",
]

log = logging.getLogger(__name__)

HF_KEY = "hf"
#: auto classes tried, in order, to find the architecture named in config.json
AUTO_CLASSES = (
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForImageClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModel",
)
#: files copied along with the weights so the folder keeps its tokenizer / image processor
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "generation_config.json",
)


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "Hugging Face folders need the optional dependency transformers: "
            "pip install 'nncompress[hf]'"
        ) from exc
    # transformers draws tqdm bars while loading / saving weights; library code never prints
    transformers.utils.logging.disable_progress_bar()
    return transformers


def is_hf_folder(path: str | Path) -> bool:
    """A folder with ``config.json`` and ``model.safetensors`` (or a sharded index)."""
    p = Path(path)
    return (
        p.is_dir()
        and (p / "config.json").is_file()
        and ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())
    )


def _model_class(config) -> type[nn.Module]:
    """The model class for ``config.architectures[0]`` among the auto classes' mappings."""
    tf = _transformers()
    arch = (getattr(config, "architectures", None) or [None])[0]
    found = []
    for auto_name in AUTO_CLASSES:
        mapping = getattr(tf, auto_name)._model_mapping
        if type(config) not in mapping:
            continue
        cls = mapping[type(config)]
        if isinstance(cls, (tuple, list)):
            cls = cls[0]
        found.append(cls)
        if arch is None or cls.__name__ == arch:
            return cls
    names = sorted({c.__name__ for c in found})
    raise ConfigError(
        f"config.json: architecture {arch!r} is not one the transformers auto classes build "
        f"for model_type {getattr(config, 'model_type', None)!r} (known: {names}); "
        "remote code is never run"
    )


def load_hf_folder(path: str | Path) -> tuple[nn.Module, Any]:
    """``(model in eval mode, config)`` from a local Hugging Face folder, offline, no remote
    code. Raises ConfigError naming what is missing."""
    p = Path(path)
    if not is_hf_folder(p):
        raise ConfigError(
            f"'{p}': not a Hugging Face model folder (needs config.json and model.safetensors)"
        )
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    cls = _model_class(config)
    model = cls.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    return model.eval(), config


def _fresh(config) -> nn.Module:
    cls = _model_class(config)
    torch_state = torch.random.get_rng_state()
    try:
        model = cls(config)  # random init, replaced by the stored weights
    finally:
        torch.random.set_rng_state(torch_state)
    return model.eval()


def hf_metadata(model: nn.Module, config: Any | None = None, **extra: Any) -> dict[str, Any]:
    """Metadata for :func:`nncompress.io.save_compressed` of a Hugging Face model: its config,
    architecture and structural replacements (see the module docstring)."""
    from ..engine.modspec import diff_modules

    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        raise ConfigError("hf_metadata: the model has no .config (not a Hugging Face model?)")
    cfg = config.to_dict()
    plain = folded_copy(model)
    replacements = diff_modules(plain, _fresh(config))
    meta = {
        HF_KEY: {
            "config": cfg,
            "architecture": type(model).__name__,
            "replacements": replacements,
        }
    }
    meta.update(extra)
    return meta


def model_from_hf_metadata(metadata: Any) -> nn.Module:
    """The (untrained) model a ``.ncz``'s Hugging Face metadata describes, replacements
    applied, ready for ``load_state_dict`` of the decoded tensors."""
    from ..engine.modspec import apply_replacements

    info = metadata.get(HF_KEY) if isinstance(metadata, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ConfigError(
            "the file's metadata has no 'hf.config': it was not written from a HF model"
        )
    tf = _transformers()
    cfg = dict(info["config"])
    model_type = cfg.get("model_type")
    try:
        config = tf.AutoConfig.for_model(
            model_type, **{k: v for k, v in cfg.items() if k != "model_type"}
        )
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"hf.config: model_type={model_type!r} unknown to transformers") from exc
    if info.get("architecture"):
        config.architectures = [info["architecture"]]
    model = _fresh(config)
    if info.get("replacements"):
        apply_replacements(model, info["replacements"])
    return model


def _multiplied_out(
    model: nn.Module, replacements: dict[str, Any]
) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(name, W (out x in), bias)`` of each factorised layer (a Sequential of Linears)
    multiplied back into one matrix, for the architecture's own module."""
    out = []
    for name in replacements:
        seq = model.get_submodule(name)
        if not (isinstance(seq, nn.Sequential) and all(isinstance(x, nn.Linear) for x in seq)):
            raise ConfigError(f"layer '{name}': only Linear factor chains can be multiplied out")
        w = seq[0].weight.detach().double()  # (r, in)
        for lin in seq[1:]:
            w = lin.weight.detach().double() @ w  # (out, in)
        bias = seq[-1].bias
        out.append((name, w.float(), None if bias is None else bias.detach()))
    return out


def decode_to_hf_folder(
    path: str | Path, out: str | Path, *, tokenizer_from: str | Path | None = None
) -> Path:
    """Decode a ``.ncz`` written from a Hugging Face model into a folder that
    ``AutoModel.from_pretrained(out)`` loads (the tensors bit for bit as decoded, except
    factorised layers, which are multiplied out). ``out`` must not exist or be empty."""
    from .decode import decode_file

    state, metadata = decode_file(path)
    model = model_from_hf_metadata(metadata)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"'{path}': decoded tensors do not fit the recorded model: {exc}"
        ) from exc
    replacements = (metadata.get(HF_KEY) or {}).get("replacements") or {}
    if replacements:
        fresh = model_from_hf_metadata({HF_KEY: {**metadata[HF_KEY], "replacements": {}}})
        fresh_sd = fresh.state_dict()
        merged = {k: v for k, v in model.state_dict().items() if k in fresh_sd}
        for name, w, bias in _multiplied_out(model, replacements):
            target = fresh.get_submodule(name)
            key = f"{name}.weight"
            merged[key] = (w.T if type(target).__name__ == "Conv1D" else w).contiguous()
            if bias is not None:
                merged[f"{name}.bias"] = bias
        fresh.load_state_dict(merged, strict=True)
        model = fresh
    return save_hf_folder(model, out, tokenizer_from=tokenizer_from)


def save_hf_folder(
    model: nn.Module, out: str | Path, *, tokenizer_from: str | Path | None = None
) -> Path:
    """Write ``model`` (parametrizations folded) with ``save_pretrained`` into ``out``, plus the
    tokenizer / processor files of ``tokenizer_from``. Written to a temporary folder and moved
    into place: ``out`` must not exist (or be an empty folder), nothing is overwritten."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--hf-out '{out}': exists and is not an empty folder; not overwritten")
    plain = folded_copy(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer_from is not None:
            src = Path(tokenizer_from)
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a folder as a dict."""
    return json.loads((Path(path) / "config.json").read_text())
