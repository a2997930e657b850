"""Loading a model and its tokenizer: the embedded default, a local folder or a hub id.

What is given is looked at in this order, and each failure is one clear
:class:`ModelLoadError` (a ``ValueError``):

1. ``None``: the embedded default model (:data:`DEFAULT_MODEL_DIR`).
2. An existing folder: it must hold a transformers checkpoint (``config.json``) and its
   tokenizer. Whether MambaLRP has rules for the model's layers is decided by ``MambaLRP(model)``
   (``UnsupportedModelError`` naming the layer), not by a list of model types here.
3. Something that looks like a path (``/``, ``./``, ``../``, ``~``, a trailing ``/``, a
   Windows drive) and does not exist: ``no such folder``.
4. Otherwise a hub id (``name`` or ``owner/name``): first from the local Hugging Face cache;
   then, unless ``HF_HUB_OFFLINE`` is set, from the hub, after a quick check (3 s) that the
   hub (``HF_ENDPOINT``) can be reached at all, so an unreachable hub fails in seconds
   instead of after the download retries.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from typing import Any, Dict, Iterator, Optional, Tuple
from urllib.parse import urlparse

from torch import nn

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "default_model")

HUB_PROBE_SECONDS = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class ModelLoadError(ValueError):
    """The model named cannot be loaded: the message says why in one line and what to do."""


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a file-system path (not a hub id ``owner/name``).

    >>> looks_like_path("./ckpt"), looks_like_path("state-spaces/mamba-130m-hf"), looks_like_path("/no/such")
    (True, False, True)
    """
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name in (".", "..")
        or name.endswith(("/", "\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", name))
        or not _HUB_ID.match(name)
    )


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: the hub is never contacted."""
    try:
        from huggingface_hub import is_offline_mode

        if is_offline_mode():
            return True
    except ImportError:  # older huggingface_hub
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    return os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> str:
    """The hub's address (``HF_ENDPOINT``, default ``https://huggingface.co``)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_reachable(endpoint: Optional[str] = None, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds.

    >>> hub_reachable("http://127.0.0.1:1", timeout=1.0)
    False
    """
    url = urlparse(endpoint or hub_endpoint())
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_source(path_or_id: Optional[str]) -> Tuple[str, bool]:
    """Where to load from and whether only local files may be read.

    Returns:
        ``(folder_or_hub_id, local_files_only)``.

    Raises:
        ModelLoadError: no such folder; a file instead of a folder; an empty folder or one
            without ``config.json``; a hub id neither cached nor reachable.

    >>> resolve_model_source(None)[1]
    True
    """
    if path_or_id is None:
        return DEFAULT_MODEL_DIR, True
    name = str(path_or_id)
    if not name.strip():
        raise ModelLoadError("--model is empty: give a checkpoint folder or a hub id (or leave it out for the default model)")
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        check_checkpoint_folder(expanded)
        return expanded, True
    if os.path.exists(expanded):
        raise ModelLoadError(f"{name} is a file, not a model folder: give the folder that holds config.json")
    if looks_like_path(name):
        raise ModelLoadError(f"no such folder: {name}")
    if _in_hub_cache(name):
        return name, True
    if hub_offline():
        raise ModelLoadError(
            f"no such folder: {name}; as a hub id it is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set "
            "(download it once with network access, or give a checkpoint folder)"
        )
    if not hub_reachable():
        raise ModelLoadError(
            f"no such folder: {name}; as a hub id it is not in the local Hugging Face cache, and the hub "
            f"({hub_endpoint()}) cannot be reached (no network? set HF_HUB_OFFLINE=1 to stop trying)"
        )
    return name, False


def check_checkpoint_folder(folder: str) -> None:
    """A transformers checkpoint with its tokenizer, or one clear error.

    Raises:
        ModelLoadError: the folder is empty, has no ``config.json``, an unreadable one, or no tokenizer.
    """
    entries = os.listdir(folder)
    if not entries:
        raise ModelLoadError(f"model folder {folder} is empty: save a checkpoint there with model.save_pretrained(...)")
    if "config.json" not in entries:
        raise ModelLoadError(
            f"{folder} has no config.json: it is not a transformers checkpoint (save one with model.save_pretrained(...))"
        )
    _read_config(os.path.join(folder, "config.json"))
    if not any(f in entries for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} has no tokenizer (tokenizer.json or tokenizer_config.json): "
            "save it there with tokenizer.save_pretrained(...)"
        )


def _read_config(config_path: str) -> dict:
    import json

    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {config_path}: {err}") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelLoadError(f"{config_path} has no model_type: it is not a transformers model config")
    return config


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the cache cannot hold
        return False
    return isinstance(found, str)


def load_model_and_tokenizer(path_or_id: Optional[str] = None, device: str = "cpu", dtype=None) -> Tuple[nn.Module, Any]:
    """``from_pretrained`` of a transformers checkpoint (folder or hub id) and its tokenizer.

    ``None`` loads the embedded default (a small Emotion classifier shipped with the
    package, float16 weights computed in float32). Checkpoints saved from
    :class:`MambaForLastTokenClassification` load as that class; anything else as
    ``AutoModelForCausalLM``. See the module docstring for the order in which a name is
    tried and for the hub's offline handling.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device``.

    Raises:
        ModelLoadError: one line on what is wrong with ``path_or_id`` (no such folder, not a
            checkpoint, not a causal LM, hub not reachable, no such hub model).

    >>> model, tokenizer = load_model_and_tokenizer()
    >>> model.config.id2label[1]
    'joy'
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .classifier import MambaForLastTokenClassification

    source, local_only = resolve_model_source(path_or_id)
    if path_or_id is None and dtype is None:
        dtype = torch.float32  # the embedded weights are stored in float16 to keep the package small
    name = path_or_id or source
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:  # the hub said no (unknown, gated or private repository), or a file is broken
        raise ModelLoadError(f"cannot load a model config from {name}: {_first_line(err)}") from None
    kwargs: Dict[str, Any] = {"local_files_only": local_only}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model: nn.Module
    try:
        with _no_loading_bar(path_or_id is None):  # the embedded model loads at once: no bar for it
            if MambaForLastTokenClassification.__name__ in (getattr(config, "architectures", None) or []):
                model = MambaForLastTokenClassification.from_pretrained(source, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"cannot load the model weights from {name}: {_first_line(err)}") from None
    except ValueError as err:  # a model type transformers has no causal-LM class for (an encoder, ...)
        raise ModelLoadError(
            f"{name} is a {config.model_type!r} model, which does not load as a causal LM: {_first_line(err)}"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {name}: {_first_line(err)}") from None
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]


@contextlib.contextmanager
def _no_loading_bar(quiet: bool) -> Iterator[None]:
    """transformers' progress bars off inside the block (when ``quiet``), as they were after it."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    if quiet and was_on:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_on:
            logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
