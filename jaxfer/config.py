"""Recipe files and command-line overrides.

A recipe is a Python file with ``get_config()`` returning an
``ml_collections.ConfigDict`` (big_vision style); ``get_config`` may take one
string argument given after a colon: ``configs/x.py:smoke``. Overrides come from
the command line as ``--config.optim.lr=3e-5``. An override naming a key the
recipe does not have is an error naming the key and the keys that do exist:
a typo never silently does nothing. Every problem here is a
:class:`~jaxfer.errors.ConfigError` (a missing file: ``FileNotFoundError``).

A trained run's workdir holds the config it ran with (``config.json``, plain
JSON: tuples come back as lists); :func:`load_saved` reads it back, so
``jaxfer eval/predict/export/serve`` rebuild the run exactly as it trained.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
from collections.abc import Iterable

import ml_collections

from jaxfer.errors import ConfigError

PREFIX = "--config."
SAVED = "config.json"


def load(spec: str) -> ml_collections.ConfigDict:
    """``"path/to/recipe.py[:arg]"`` -> the recipe's ``get_config([arg])``, locked."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"jaxfer_recipe_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"config file {path!r} does not run: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config() function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        raise ConfigError(f"{path}: get_config({arg!r}): {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    config.lock()  # adding a key by mistake is an error from here on
    return config


def _parse_value(text: str, current):
    """Parse ``text`` to the type of ``current`` (Python literal syntax for tuples/lists)."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    if isinstance(current, ml_collections.ConfigDict):  # a whole section, as a dict literal
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise ConfigError(f"expected a dict literal for a section, got {text!r}")
        return ml_collections.ConfigDict(value)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if current is None:
            return text  # a string where the recipe had no value
        raise ConfigError(f"cannot parse {text!r} as {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        value = type(current)(value)  # a saved config.json holds lists where recipes had tuples
    if current is not None and (not isinstance(value, type(current))
                                or isinstance(value, bool) != isinstance(current, bool)):
        raise ConfigError(f"expected {type(current).__name__}, got {text!r}")
    return value


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, full + "."))
    return keys


def override(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
    """Set ``config.<dotted_key>`` from the string ``text``; unknown keys raise."""
    node = config
    parts = dotted_key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = _all_keys(config)
            near = difflib.get_close_matches(dotted_key, known, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"unknown config key {dotted_key!r}{hint}")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    try:
        value = _parse_value(text, current)
    except ConfigError as e:
        raise ConfigError(f"config key {dotted_key!r}: {e}") from None
    with node.unlocked():
        node[parts[-1]] = value


def split_overrides(argv: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--config.a.b=v`` / ``--config.a.b v`` overrides from other arguments."""
    rest, overrides = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(PREFIX):
            key, eq, value = arg[len(PREFIX):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {arg} has no value")
                value = argv[i + 1]
                i += 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load_with_overrides(spec: str | ml_collections.ConfigDict,
                        overrides: Iterable[tuple[str, str]]) -> ml_collections.ConfigDict:
    """A recipe (``"path.py[:arg]"``, or a loaded config) with the overrides applied."""
    config = load(spec) if isinstance(spec, str) else spec
    for key, value in overrides:
        override(config, key, value)
    return config


def saved_path(workdir: str) -> str:
    import os

    return os.path.join(os.fspath(workdir), SAVED)


def load_saved(workdir: str) -> ml_collections.ConfigDict | None:
    """The config a run in ``workdir`` trained with (``None`` if it saved none), locked."""
    from jaxfer import workdir as workdir_lib

    path = saved_path(workdir)
    if not workdir_lib.exists(path):
        return None
    try:
        saved = workdir_lib.read_json(path)
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    config = ml_collections.ConfigDict(saved)
    config.lock()
    return config


def differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list[str]:
    """Dotted keys whose values differ between two configs (lists and tuples alike)."""
    def flat(c, prefix=""):
        out = {}
        for k, v in c.items():
            if isinstance(v, ml_collections.ConfigDict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = _plain(v)
        return out

    fa, fb = flat(a), flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, _MISSING) != fb.get(k, _MISSING))


_MISSING = object()


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
