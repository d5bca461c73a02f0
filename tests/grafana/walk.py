"""Read the committed dashboard JSON the way Grafana sees it: panels, queries, links."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.helpers import REPO

DASHBOARD_DIR = REPO / "grafana" / "dashboards"
_MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Query:
    """One PromQL expression a dashboard runs, and where it sits."""

    where: str  # "<uid> / <panel title> / <refId>" or "<uid> / annotation <name>"
    expr: str
    instant: bool


def load_dashboards() -> dict[str, dict[str, Any]]:
    """Committed dashboards by file name."""
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARD_DIR.glob("*.json"))
    }


def by_uid() -> dict[str, dict[str, Any]]:
    return {board["uid"]: board for board in load_dashboards().values()}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows; rows themselves too."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any]) -> Iterator[Query]:
    """Panel targets and annotation queries (Prometheus ones: those with an ``expr``)."""
    uid = board["uid"]
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield Query(
                f"{uid} / {panel.get('title')} / {target.get('refId')}",
                target["expr"],
                bool(target.get("instant")) and not target.get("range"),
            )
    for annotation in board.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield Query(f"{uid} / annotation {annotation['name']}", annotation["expr"], False)


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


def urls(node: Any) -> Iterator[str]:
    """Every link target: ``url`` values anywhere, and links inside markdown text."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "url" and isinstance(value, str):
                yield value
            elif key == "content" and isinstance(value, str):
                yield from _MARKDOWN_LINK.findall(value)
            else:
                yield from urls(value)
    elif isinstance(node, list):
        for item in node:
            yield from urls(item)


def datasource_uids(node: Any) -> Iterator[str]:
    """The uid of every datasource reference in the JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                yield str(value.get("uid"))
            else:
                yield from datasource_uids(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_uids(item)
