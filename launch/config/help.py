"""`--help` for every entry point, generated from the args dataclass it passes to `load_config`.

Each key is listed with its type, its default and the `# comment` written next to the field (or
the comment lines just above it), so the help is never a second, hand-kept list. Nested
dataclasses are config sections (`train.steps`), introduced by their class docstring. A new CLI
gets all of this by calling `load_config(argv, ItsArgs)`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import sys
import typing
from typing import Any

_FIELD = re.compile(r"^\s*(\w+)\s*:[^#]*?(?:#\s*(.*))?$")

FLAGS = (
    "  --help, -h                  this text\n"
    "  print_config=true, --cfg    print the resolved config (YAML) and exit\n"
)


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} from the class source: the comment on the field's line, or the
    comment lines directly above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, pending = {}, []
    for line in source.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m and not stripped.startswith(("def ", "@", "return")):
            comments.setdefault(m.group(1), (m.group(2) or " ".join(pending)).strip())
        pending = []
    return comments


def type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_value(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.isprintable() and value.strip() == value else json.dumps(value)
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses invents: not a description
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def key_rows(schema: type, prefix: str = "") -> list[tuple[str, str, str, str, type | None]]:
    """(dotted key, type, default, description, section class or None) for every field, depth first;
    a section's own row comes before its keys."""
    hints = typing.get_type_hints(schema)
    comments = field_comments(schema)
    rows, sections = [], []
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sections.append((f.name, tp))
            continue
        rows.append(
            (prefix + f.name, type_name(tp), format_value(_default(f)), comments.get(f.name, ""), None)
        )
    for name, tp in sections:
        rows.append((prefix + name, "section", "", comments.get(name, "") or _doc(tp), tp))
        rows += key_rows(tp, prefix + name + ".")
    return rows


def usage_line(default_module: str | None = None) -> str:
    """The first paragraph of the running entry point's docstring (`python -m launch.X`)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", "") or ""
    if name.startswith("launch") and main.__doc__:
        return "usage: " + " ".join(main.__doc__.strip().split("\n\n")[0].split())
    return f"usage: python -m {default_module or name or 'launch.<command>'} [config=FILE] [key=value ...]"


def help_text(schema: type, usage: str | None = None) -> str:
    lines = [
        usage or usage_line(),
        "",
        "options:",
        FLAGS.rstrip("\n"),
        "",
        "keys (key=value on the command line, or in a YAML file given as config=FILE):",
    ]
    rows = key_rows(schema)
    width = min(max((len(k) + len(t) + len(d) for k, t, d, _, sec in rows if sec is None), default=0) + 6, 60)
    for key, tp, default, desc, section in rows:
        if section is not None:
            lines += ["", f"[{key}]" + (f"  {desc}" if desc else "")]
            continue
        head = f"  {key}: {tp} = {default}"
        lines.append(f"{head:<{width}} {desc}".rstrip() if desc else head)
    return "\n".join(lines) + "\n"
