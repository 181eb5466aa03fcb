"""How an encoder checkpoint turns token states into a sentence embedding: its sentence-transformers config.

``load_pooler_config(directory, hf_config)`` reads what sentence-transformers reads, and nothing runs:

- ``modules.json``: the module pipeline. flotilla runs ``Transformer`` (the model in the directory's root),
  ``Pooling`` and ``Normalize``; any other module (``Dense``, ``LayerNorm`` ...) is a ModelLoadError naming
  it, never silently skipped. Without ``modules.json`` the defaults are sentence-transformers' own for a
  plain Hugging Face model: mean pooling, no normalisation.
- ``<pooling path>/config.json``: ``pooling_mode`` (a mode or a list), or the legacy ``pooling_mode_*_token(s)``
  booleans (concatenated in sentence-transformers' order; none set means mean); ``include_prompt: false``
  is refused.
- ``sentence_bert_config.json`` (or its legacy per-family names): ``max_seq_length`` (inputs are truncated
  to it) and ``do_lower_case``.
- ``config_sentence_transformers.json``: the prompt named by ``default_prompt_name``, which
  sentence-transformers prepends to every text by default.
- ``config.json``: ``matryoshka_dimensions`` / ``is_matryoshka`` (vLLM's keys): whether a request may ask
  for fewer ``dimensions``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from flotilla.errors import ModelLoadError
from flotilla.layers.pooler import POOLING_MODES

_LEGACY_MODE_KEYS = {  # sentence-transformers' concatenation order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json",
                        "sentence_distilbert_config.json", "sentence_camembert_config.json",
                        "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
                        "sentence_xlnet_config.json")


@dataclass(frozen=True)
class PoolerConfig:
    """How token states become one embedding (see the module docstring). ``source`` says where it came
    from, for the startup banner."""

    pooling_modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    default_prompt: str | None = None
    matryoshka_dimensions: tuple[int, ...] | None = None
    is_matryoshka: bool = False
    source: str = "defaults (no modules.json)"

    def describe(self) -> str:
        norm = ", normalize" if self.normalize else ""
        return f"{'+'.join(self.pooling_modes)}{norm} ({self.source})"


def load_pooler_config(directory: str, hf_config: Any) -> PoolerConfig:
    """The pooler of the encoder checkpoint in ``directory``; ModelLoadError for what flotilla cannot run."""
    matryoshka = _matryoshka(hf_config)
    transformer = _transformer_config(directory)
    common = dict(max_seq_length=transformer.get("max_seq_length"),
                  do_lower_case=bool(transformer.get("do_lower_case", False)),
                  default_prompt=_default_prompt(directory), matryoshka_dimensions=matryoshka,
                  is_matryoshka=bool(getattr(hf_config, "is_matryoshka", False)) or matryoshka is not None)
    _check_max_seq_length(common["max_seq_length"], directory)
    modules_path = os.path.join(directory, "modules.json")
    if not os.path.isfile(modules_path):
        return PoolerConfig(**common)
    modules = _read_json(modules_path, list)
    modes, normalize = None, False
    for i, module in enumerate(modules):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1] if isinstance(module, dict) else ""
        path = str(module.get("path", "")) if isinstance(module, dict) else ""
        if kind == "Transformer" and i == 0 and path in ("", "."):
            continue
        if kind == "Pooling" and modes is None:
            modes = _pooling_modes(os.path.join(directory, path, "config.json"))
        elif kind == "Normalize" and modes is not None and i == len(modules) - 1:
            normalize = True
        else:
            raise ModelLoadError(f"{modules_path}: module {i} ({module!r}) is not supported; flotilla runs a "
                                 f"Transformer in the model directory's root, then Pooling, then optionally "
                                 f"Normalize")
    if modes is None:
        raise ModelLoadError(f"{modules_path} has no Pooling module: there is no sentence embedding to serve")
    return PoolerConfig(pooling_modes=modes, normalize=normalize, source="sentence-transformers config", **common)


def _pooling_modes(path: str) -> tuple[str, ...]:
    config = _read_json(path, dict)
    if config.get("include_prompt", True) is not True:
        raise ModelLoadError(f"{path}: include_prompt false (pooling without the prompt's tokens) is not supported")
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else ()
    else:
        modes = tuple(m for key, m in _LEGACY_MODE_KEYS.items() if config.get(key) is True) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if not modes or bad:
        raise ModelLoadError(f"{path}: pooling mode {mode if mode is not None else bad!r} is not one of "
                             f"{', '.join(POOLING_MODES)}")
    return modes


def _transformer_config(directory: str) -> dict:
    for name in _TRANSFORMER_CONFIGS:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return _read_json(path, dict)
    return {}


def _check_max_seq_length(value, directory: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ModelLoadError(f"{directory}: max_seq_length must be a positive integer, got {value!r}")


def _default_prompt(directory: str) -> str | None:
    path = os.path.join(directory, "config_sentence_transformers.json")
    if not os.path.isfile(path):
        return None
    config = _read_json(path, dict)
    name = config.get("default_prompt_name")
    if name is None:
        return None
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not isinstance(prompts.get(name), str):
        raise ModelLoadError(f"{path}: default_prompt_name {name!r} names no prompt in 'prompts'")
    return prompts[name]


def _matryoshka(hf_config: Any) -> tuple[int, ...] | None:
    dims = getattr(hf_config, "matryoshka_dimensions", None)
    if dims is None:
        return None
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) and d >= 1 for d in dims):
        raise ModelLoadError(f"config.json: matryoshka_dimensions must be a list of positive integers, got {dims!r}")
    return tuple(dims)


def _read_json(path: str, kind: type):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist (named by the model's sentence-transformers config)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, kind):
        raise ModelLoadError(f"{path} must hold a JSON {kind.__name__}, found {type(value).__name__}")
    return value
