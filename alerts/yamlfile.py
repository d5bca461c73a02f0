"""Hand-edited YAML files checked by pydantic, with every problem at ``FILE:LINE:COL``.

Shared by the rules file (``alerts.rules``) and the targets file (``alerts.targets``):
both are edited by the people who get paged by them, so a mistake must be reported
at once, all of them, pointing at the offending key or value, and YAML's habit of
silently turning ``1e-3`` or ``yes`` into something else must not change what a
file means. Pure module: PyYAML and pydantic only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Issue:
    """One problem in a file; ``line``/``column`` are 1-based (0: the whole file)."""

    line: int
    column: int
    path: str
    message: str

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}:{self.column}:" if self.line else f"{source}:"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where} {self.message}"


class FileError(Exception):
    """An invalid file; ``str()`` is one ``FILE:LINE:COL: path: message`` per issue."""

    def __init__(self, issues: Sequence[Issue], source: str = "<string>") -> None:
        self.issues = sorted(issues, key=lambda i: (i.line, i.column))
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(issue.format(self.source) for issue in self.issues)


def one_of(options: Sequence[str]) -> str:
    """Pydantic's wording for literals, so custom choices read like built-in ones."""
    quoted = [f"'{o}'" for o in options]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def number_hint(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as text; say so instead of "should be a valid number"."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if not math.isfinite(number):
            return value
        raise PydanticCustomError(
            "yaml_number",
            "{text} is text in YAML, not a number; write {number}",
            {"text": repr(value), "number": repr(int(number) if number.is_integer() else number)},
        )
    return value


def dotted(loc: Sequence[int | str]) -> str:
    """``("rules", 0, "kpi")`` -> ``rules[0].kpi``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def scalar(node: yaml.Node) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def locate(root: yaml.Node | None, loc: Sequence[int | str], key: bool) -> tuple[int, int]:
    """1-based line/column of the deepest YAML node along ``loc``.

    A mapping entry resolves to its value when that is a scalar (the thing to fix)
    and to its key when the value is a block or the key itself is wrong (unknown
    keys, ``[key]`` errors). A path that leaves the document stops at the last
    node found, so a missing field points at the mapping that lacks it.
    """
    if root is None:
        return 1, 1
    parts = list(loc)
    if parts[-1:] == ["[key]"]:
        parts.pop()
        key = True
    node, mark = root, root.start_mark
    for i, part in enumerate(parts):
        if isinstance(node, yaml.MappingNode):
            entries = [(k, v) for k, v in node.value if scalar(k) == str(part)]
            if not entries:
                break
            key_node, node = entries[-1]  # PyYAML keeps the last of equal keys
            on_key = (key and i == len(parts) - 1) or not isinstance(node, yaml.ScalarNode)
            mark = key_node.start_mark if on_key else node.start_mark
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            mark = node.start_mark
        else:
            break
    return mark.line + 1, mark.column + 1


def duplicate_keys(node: yaml.Node, path: str = "") -> list[Issue]:
    """PyYAML silently keeps the last of two equal keys; a checked file must not."""
    issues: list[Issue] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            name = scalar(k)
            if name is not None and name in seen:
                line, column = k.start_mark.line + 1, k.start_mark.column + 1
                issues.append(Issue(line, column, path, f"duplicate key {name!r}"))
            if name is not None:
                seen.add(name)
            issues += duplicate_keys(v, f"{path}.{name}" if path else str(name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            issues += duplicate_keys(item, f"{path}[{index}]")
    return issues


def pydantic_issue(
    root: yaml.Node | None,
    kind: str,
    loc: tuple[int | str, ...],
    message: str,
    *,
    missing: Mapping[tuple[int | str, ...], str] | None = None,
    key_message: str = "keys must be strings",
) -> Issue:
    """A pydantic error as an Issue at its place in the YAML, in the user's words.

    ``missing`` rewords "Field required" at given locations (e.g. an empty file's
    top-level list); ``key_message`` is said of a mapping key of the wrong type.
    """
    line, column = locate(root, loc, key=kind == "extra_forbidden")
    message = message.removeprefix("Value error, ")
    if loc[-1:] == ("[key]",):
        loc = loc[:-1]
        message = f"{key_message} ({message})"
    if kind == "tuple_type":
        message = "Input should be a list"
    elif kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "model_type":
        message = "expected a mapping of key: value"
    elif kind == "missing" and missing and loc in missing:
        message = missing[loc]
    return Issue(line, column, dotted(loc), message)


def validation_issues(
    exc: ValidationError,
    root: yaml.Node | None,
    reword: Callable[[yaml.Node | None, str, tuple[int | str, ...], str], Issue],
) -> list[Issue]:
    """Every error of ``exc`` through ``reword``; a custom error's ``at`` context overrides
    its location (a model validator cannot set ``loc``)."""
    issues = []
    for err in exc.errors(include_url=False, include_input=False):
        ctx = err.get("ctx") or {}
        loc = tuple(ctx.get("at") or err["loc"])
        issues.append(reword(root, err["type"], loc, err["msg"]))
    return issues


def read_yaml(
    text: str, source: str, empty: str | None
) -> tuple[yaml.Node | None, Any, list[Issue]]:
    """Parse YAML keeping its node tree (for line numbers): ``(root, data, duplicate keys)``.

    Raises FileError for a syntax error (at its place), or for an empty document
    (only comments) with the message ``empty`` unless that is None (data is then None).
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = exc.problem or "invalid YAML"
        if exc.context:
            message += f" ({exc.context})"
        raise FileError([Issue(line, column, "", message)], source) from None
    except yaml.YAMLError as exc:
        raise FileError([Issue(1, 1, "", str(exc))], source) from None
    finally:
        loader.dispose()
    if data is None and empty is not None:
        raise FileError([Issue(1, 1, "", empty)], source)
    return root, data, duplicate_keys(root) if root is not None else []


def read_text(path: Path) -> str:
    """A file's text; unreadable or non-UTF-8 files are a FileError (no line)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise FileError([Issue(0, 0, "", f"cannot read: {reason}")], str(path)) from None
