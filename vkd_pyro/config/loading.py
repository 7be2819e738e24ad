"""Config files: YAML loading, dotted overrides and validation against the schema (`vkd_pyro.config.schema`).

A config file is UTF-8 YAML holding one mapping with the schema's sections; any key left out keeps
its default, and an empty file (or one holding only comments or `null`) is all defaults. Every
mistake raises :class:`ConfigError` with one line that names the file and the dotted key, which the
CLI prints before exiting with status 2: an unknown key, a wrong type, a value out of range, a file
that is missing, a folder, unreadable, not UTF-8 text or not valid YAML, a top level that is not a
mapping, a key written twice in one mapping, YAML aliases that would expand to more than
`MAX_YAML_NODES` values (checked before anything is expanded), an integer beyond 64 bits, a
non-finite number (.nan, .inf) anywhere a number is read, and a seed (`seed`, any `*_seed`) outside
0..2**32-1. An empty `VKD_PYRO_CACHE` environment variable is refused too (see `cache_dir_from_env`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from vkd_pyro.config.schema import Config, cache_dir_from_env
from vkd_pyro.errors import ConfigError
from vkd_pyro.files import write_text

#: Integers must fit in a signed 64-bit integer (what torch and numpy hold them in).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Seeds (`seed` and every `*_seed` key) are what numpy's and torch's generators accept.
SEED_MAX = 2**32 - 1
#: A config file may hold at most this many YAML values once its aliases are expanded.
MAX_YAML_NODES = 10_000
#: ... and at most this many aliases (`*name`).
MAX_YAML_ALIASES = 100


def _is_seed(dotted: str) -> bool:
    name = dotted.rsplit(".", 1)[-1]
    return name == "seed" or name.endswith("_seed")


def _check_finite(value: Any, where: str) -> None:
    """ConfigError naming `where` for a float that is NaN or infinite or an int beyond 64 bits,
    looking inside lists and mappings (option dicts) too."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        digits = str(abs(value))
        shown = value if len(digits) <= 30 else f"{'-' if value < 0 else ''}{digits[:6]}...({len(digits)} digits)"
        raise ConfigError(f"{where}: {shown} does not fit in a 64-bit integer")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")


def _type_name(tp) -> str:
    if _is_optional(tp):
        return _type_name(_optional_arg(tp)) + " or null"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _optional_arg(tp):
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _coerce(value: Any, tp, where: str):
    """`value` as type `tp`, or ConfigError naming `where`. Ints pass as floats; numeric strings as
    floats. Numbers must be finite and integers fit in 64 bits, wherever they are (`_check_finite`)."""
    _check_finite(value, where)
    if _is_optional(tp):
        return None if value is None else _coerce(value, _optional_arg(tp), where)
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                _check_finite(number, where)
                return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, values: dict, where: str):
    """An instance of dataclass `cls` from a (partial) mapping, validating every key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{dotted}: unknown key (known: {', '.join(fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, dotted)
            continue
        value = _coerce(value, tp, dotted)
        if _is_seed(dotted) and isinstance(value, int) and not 0 <= value <= SEED_MAX:
            raise ConfigError(f"{dotted}: {value} must be in 0..{SEED_MAX} (a seed)")
        check = fields[key].metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise ConfigError(f"{dotted}: {value!r} {check[1]}")
        kwargs[key] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def split_assignment(text: str) -> Optional[tuple[str, str]]:
    """`key=rest` -> ("key", "rest") (the key stripped); None when there is no `=` or no key."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    return (key, raw) if sep and key else None


def parse_value(raw: str, source: str = "value") -> Any:
    """A value as YAML reads it (1 -> int, 0.5 -> float, true -> bool, [1, 2] -> list); the text
    itself when it is not YAML; "" for blank text. Read with the same limits as a config file
    (no duplicate keys, bounded aliases): such a value is refused with a ConfigError."""
    if not raw.strip():
        return ""
    try:
        return _safe_yaml(raw, source)
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except yaml.YAMLError:
        return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", value parsed as YAML)."""
    assignment = split_assignment(text)
    if assignment is None:
        raise ConfigError(f"{text}: overrides are written key.sub=value")
    key, raw = assignment
    return key, parse_value(raw, key)


def config_from_dict(values: dict, source: str = "config", overrides: typing.Sequence[str] = ()) -> Config:
    """A validated Config from a mapping (as read from YAML) and dotted overrides."""
    tree = dict(values or {})
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy
    try:
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(tree, key, value)
        return _build(Config, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _node_line(node) -> int:
    return node.start_mark.line + 1


def _check_nodes(root, source: str) -> None:
    """Walk a composed YAML node graph (aliases not expanded) and refuse, with a ConfigError naming
    `source` and the dotted key: a key written twice in one mapping, a recursive alias, more than
    MAX_YAML_ALIASES aliases, or more than MAX_YAML_NODES values once aliases were expanded."""
    sizes: dict[int, int] = {}  # id(node) -> its expanded size
    open_nodes: set[int] = set()
    aliases = 0

    def walk(node, dotted: str) -> int:
        nonlocal aliases
        name = dotted or "(top level)"
        if id(node) in sizes:  # a second reference to a node: an alias
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise ConfigError(f"{source}: {name}: more than {MAX_YAML_ALIASES} YAML aliases (line {_node_line(node)})")
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ConfigError(f"{source}: {name}: a YAML alias refers to itself (line {_node_line(node)})")
        open_nodes.add(id(node))
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                child = f"{dotted}.{key}" if dotted else str(key)
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    ident = (key_node.tag, key)
                    if ident in seen:
                        raise ConfigError(f"{source}: {child}: duplicate key (lines {seen[ident]} and "
                                          f"{_node_line(key_node)}); write each key once")
                    seen[ident] = _node_line(key_node)
                size += walk(key_node, child) + walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                size += walk(item, f"{name}[{i}]")
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{source}: {name}: YAML aliases expand to more than {MAX_YAML_NODES} values "
                              f"(line {_node_line(node)}); a config needs far fewer")
        open_nodes.discard(id(node))
        sizes[id(node)] = size
        return size

    walk(root, "")


def _safe_yaml(text: str, source: str) -> Any:
    """`text` read as one YAML document with PyYAML's SafeLoader, after `_check_nodes` (None for an
    empty document). YAML syntax errors are raised as yaml.YAMLError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping in the YAML config file at `path` ({} for an empty file), or a one-line
    ConfigError naming the file (and the key, where there is one)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file (give the YAML file inside it)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: config file cannot be read ({exc.strerror or type(exc).__name__})") from None
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file, not a YAML config (it holds NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); "
                          "save the config as UTF-8") from None
    try:
        values = _safe_yaml(text, str(path))
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to be a config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None)
        raise ConfigError(f"{path}: not valid YAML{where}" + (f" ({problem})" if problem else "")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        kind = {list: "a list", str: "a string"}.get(type(values), f"a {type(values).__name__}")
        raise ConfigError(f"{path}: (top level): expected a mapping of sections (e.g. `train: {{lr: 0.001}}`), "
                          f"got {kind}")
    return values


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config file (`read_config_file`; the defaults when `path` is None), apply dotted
    overrides, and validate; a one-line ConfigError naming the file and key for any mistake. With
    `cache_dir` unset, $VKD_PYRO_CACHE is checked here too, so a blank one is refused up front."""
    if path is None:
        config = config_from_dict({}, "defaults", overrides)
    else:
        config = config_from_dict(read_config_file(path), str(path), overrides)
    if not config.cache_dir:
        cache_dir_from_env()
    return config


def save_config(config: Config, path: str | os.PathLike, comment: str = "") -> None:
    """Write the resolved config as YAML (what `train` puts in the run folder), after `comment`
    (lines starting with #: what produced the run, `vkd_pyro.training.provenance`)."""
    write_text(path, comment + yaml.safe_dump(config.to_dict(), sort_keys=False))
