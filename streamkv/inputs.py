"""Checks of a run's inputs that need the file system but nothing heavy: unknown config keys, the
local text file, a local model directory. They run in `streamkv.validate.validate`, i.e. before any job of a
command starts and again at the start of each job, so a typo fails in seconds with one line naming
the field instead of after the model weights have loaded (or with a library's message).

Whether the text is longer than `prefill_tokens` needs its tokenizer; `runner.run_job` checks that
after loading the tokenizer alone, before the weights (see `text_too_short`)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

from streamkv import config as C
from streamkv.errors import ConfigError

# Keys Hydra may add to a composed run config that are not run settings.
_HYDRA_KEYS = {"hydra"}


def _fields(schema) -> dict[str, Any]:
    """name -> the nested schema (a dataclass) or None, for one schema dataclass."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None
            for f in dataclasses.fields(schema)}


def check_known_keys(cfg, schema=None, prefix: str = "") -> None:
    """Every key of the composed config is a field of the schema (streamkv/config.py). Hydra's `+key=value`
    adds keys the schema lacks; a misspelt knob would otherwise be carried along silently."""
    schema = schema or C.RunConfig
    known = _fields(schema)
    for key in cfg.keys():
        key = str(key)
        if not prefix and key in _HYDRA_KEYS:
            continue
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{prefix}{key}: unknown key ({hint})")
        sub = known[key]
        if sub is not None and cfg.get(key) is not None and hasattr(cfg.get(key), "keys"):
            check_known_keys(cfg.get(key), sub, f"{prefix}{key}.")


def _has_text(path: Path, chunk: int = 1 << 16) -> bool:
    """True when the file holds anything but whitespace (reads only as far as the first such byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def check_text_file(path: str | None) -> None:
    """dataset=text_file: the file exists, is readable and is not empty."""
    if not path:
        return  # validate says "required" itself
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"dataset.path: no such file: {path}")
    if not p.is_file():
        raise ConfigError(f"dataset.path: not a file: {path}")
    try:
        nonempty = _has_text(p)
    except OSError as exc:
        raise ConfigError(f"dataset.path: cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    if not nonempty:
        raise ConfigError(f"dataset.path: file is empty: {path}")


def looks_like_path(value: str) -> bool:
    """A local path rather than a hub id: starts with /, ., ~ or has more separators than
    'namespace/name' allows (a hub id has at most one '/')."""
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or any(
        s in value for s in seps if s != "/")


def check_model_dir(value: str | None) -> None:
    """A path-looking model.name_or_path must be a local model directory (config.json inside); an
    existing directory counts even without a leading / or . ."""
    if not value:
        return
    p = Path(value).expanduser()
    if not looks_like_path(value) and not p.is_dir():
        return  # a hub id (namespace/name)
    if not p.exists():
        raise ConfigError(f"model.name_or_path: no such directory: {value} (a local model directory, or a hub id "
                          f"'namespace/name')")
    if not p.is_dir():
        raise ConfigError(f"model.name_or_path: not a directory: {value} (a local model directory holds "
                          f"config.json and the weights)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {value} has no config.json (not a transformers model directory)")


def check_inputs(cfg) -> None:
    """The file-system checks of one composed config: the text file, a local model directory."""
    if cfg.dataset.name == "text_file" or (cfg.dataset.name == "passkey" and cfg.dataset.get("filler") == "text_file"):
        check_text_file(cfg.dataset.path)
    if cfg.model.kind in ("hf", "gguf"):
        check_model_dir(cfg.model.name_or_path)


def text_too_short(n_tokens: int, prefill_tokens: int, path: str | None = None) -> ConfigError | None:
    """The error for a text that leaves no token to decode after the prefill, else None."""
    if n_tokens > max(prefill_tokens, 1):
        return None
    where = f"the text of dataset.path={path} has" if path else "the text has"
    return ConfigError(f"prefill_tokens: {where} only {n_tokens} tokens; need more than prefill_tokens={prefill_tokens}")
