"""Loading configs: `config=path.yaml` plus `a.b=c` overrides into a schema dataclass.

Precedence: dataclass defaults <- YAML (and the files it names under `_base_`) <- command line.
Unknown keys and wrong types fail with one line naming the key, where it came from, and what
was expected. `--help` lists every key (`launch.config.help`).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.config.schema import Config
from launch.runtime.errors import CliExit, ConfigError


def _schema_fields(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, sections included (`device`, `eval.limit`, `train.device`)."""
    keys = []
    for name, sub in _schema_fields(schema).items():
        keys.append(f"{prefix}{name}")
        if dataclasses.is_dataclass(sub):
            keys += _all_keys(sub, f"{prefix}{name}.")
    return keys


def _did_you_mean(full: str, root: type) -> str:
    """The schema's keys with the same last name as an unknown key: `launch.eval eval.device=cuda`
    is a misplaced `device=cuda`, and saying so beats a list of the wrong section's keys."""
    leaf = full.rsplit(".", 1)[-1]
    same = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1] == leaf and k != full]
    return f" (did you mean {' or '.join(repr(k) for k in same)}?)" if same else ""


def check_keys(data: Any, schema: type, source: str, prefix: str = "", root: type | None = None) -> None:
    """Fail on the first key of `data` the dataclass `schema` does not declare."""
    if not isinstance(data, dict | DictConfig):
        return
    root = schema if root is None else root
    fields = _schema_fields(schema)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
            raise ConfigError(
                f"unknown key '{full}' in {source}{_did_you_mean(full, root)}; valid keys {where}: "
                f"{', '.join(fields)}"
            )
        sub = fields[key]
        if dataclasses.is_dataclass(sub):
            if value is not None and not isinstance(value, dict | DictConfig):
                raise ConfigError(
                    f"'{full}' in {source} must be a mapping of {', '.join(_schema_fields(sub))}"
                )
            check_keys(value, sub, source, prefix=f"{full}.", root=root)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load a YAML file, first merging the files it lists under `_base_` (paths relative to it)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through _base_")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors carry line/column in their message
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(node).__name__}")
    bases = node.pop("_base_", None)
    if bases is None:
        return node
    merged = OmegaConf.create()
    for base in [bases] if isinstance(bases, str) else list(bases):
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(base), (*seen, path.resolve())))
    return OmegaConf.merge(merged, node)


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for '{key}' in {source}: {msg}") from None


HELP_FLAGS = ("--help", "-h", "help")
PRINT_FLAGS = ("--cfg", "--print-config", "print_config=true", "print_config=True", "print_config=1")


def split_cli_flags(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(argv without them, --help asked, print_config asked)."""
    rest = [a for a in argv if a not in HELP_FLAGS + PRINT_FLAGS and not a.startswith("print_config=")]
    return rest, any(a in HELP_FLAGS for a in argv), any(a in PRINT_FLAGS for a in argv)


def parse_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split argv into the `config=` path and `key=value` overrides."""
    config_path, overrides = None, []
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(
                f"expected key=value arguments (e.g. config=configs/tiny.yaml train.steps=10), got {arg!r}"
            )
        key, value = arg.split("=", 1)
        if key == "config":
            config_path = value
        else:
            overrides.append(f"{key}={value}")
    return config_path, overrides


def load_config(
    argv: list[str],
    schema: type = Config,
    base: Any = None,
    *,
    require_config: bool = False,
    usage: str | None = None,
) -> Any:
    """Build a `schema` instance from defaults, an optional `base` (dict/DictConfig, e.g. the config
    stored in a checkpoint), `config=FILE` and dotted overrides in `argv`.

    On the command line, `--help`/`-h` prints `usage` and every key of `schema` (`launch.cli_help`)
    and `print_config=true`/`--cfg` prints the resolved config, both exiting 0 through `CliExit`;
    with `require_config`, no `config=` prints the usage and exits 2."""
    from launch.config import help as cli_help

    argv, wants_help, wants_print = split_cli_flags(argv)
    if wants_help:
        raise CliExit(cli_help.help_text(schema, usage))
    config_path, overrides = parse_overrides(argv)
    if require_config and not config_path:
        raise CliExit(
            f"{usage or cli_help.usage_line()}\nerror: config=FILE is required (--help lists every key)", 2
        )
    cfg = OmegaConf.structured(schema)
    if base is not None:
        check_keys(base, schema, "the checkpoint's config")
        cfg = _merge(cfg, base, "the checkpoint's config")
    if config_path:
        node = _read_yaml(Path(config_path))
        check_keys(node, schema, config_path)
        cfg = _merge(cfg, node, config_path)
    if overrides:
        try:
            cli = OmegaConf.from_dotlist(overrides)
        except Exception as e:
            raise ConfigError(f"cannot parse command-line overrides: {str(e).splitlines()[0]}") from None
        check_keys(cli, schema, "the command line")
        cfg = _merge(cfg, cli, "the command line")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {str(e).splitlines()[0]}") from None
    if wants_print:
        raise CliExit(to_yaml(obj))
    return obj


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_container(data: dict, schema: type = Config) -> Any:
    return load_config([], schema, base=data)


def plain(node: Any) -> Any:
    """An OmegaConf node as plain Python containers (anything else unchanged)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def config_from_file(path: str | Path, schema: type = Config) -> Any:
    """A saved, resolved config (a run's or a checkpoint's config.yaml) as a `schema` instance."""
    return from_container(plain(OmegaConf.load(path)), schema)
