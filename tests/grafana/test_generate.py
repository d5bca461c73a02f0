"""The generator: committed JSON is a fresh generation, and the SDK's model accepts it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from grafana.generate import OUT_DIR, generate, main, stale_files
from grafana.panels import CAMPAIGN_UID, PIPELINE_UID, WALL_UID
from tests.grafana.walk import load_dashboards


def test_committed_json_equals_a_fresh_generation() -> None:
    assert stale_files(OUT_DIR, generate()) == [], "run: python -m grafana.generate"


def test_generation_is_deterministic() -> None:
    assert generate() == generate()


def test_check_flag_reports_missing_changed_and_orphan_files(tmp_path: Path) -> None:
    assert main(["--check", "--out", str(tmp_path)]) == 1  # nothing written yet
    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--check", "--out", str(tmp_path)]) == 0
    wall = tmp_path / "kpi-wall.json"
    wall.write_text(wall.read_text().replace('"15s"', '"5s"'))
    assert main(["--check", "--out", str(tmp_path)]) == 1
    main(["--out", str(tmp_path)])
    (tmp_path / "old.json").write_text("{}")
    assert stale_files(tmp_path, generate()) == ["old.json"]


def test_runbook_base_is_configurable() -> None:
    files = generate("https://runbooks.example/kpimon")
    assert "https://runbooks.example/kpimon/worker-down.md" in files["pipeline.json"]
    assert "docs/runbooks/" not in files["pipeline.json"]


def test_fixed_uids_and_file_names() -> None:
    uids = {name: board["uid"] for name, board in load_dashboards().items()}
    assert uids == {
        "kpi-wall.json": WALL_UID,
        "campaign.json": CAMPAIGN_UID,
        "pipeline.json": PIPELINE_UID,
    }
    assert (WALL_UID, CAMPAIGN_UID, PIPELINE_UID) == (
        "kpimon-wall",
        "kpimon-campaign",
        "kpimon-pipeline",
    )


def _round_trip(data: dict[str, Any]) -> Any:
    """JSON -> the SDK's typed dashboard model (panel options decoded per plugin) -> JSON."""
    register_default_plugins()
    return json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder))


@pytest.mark.parametrize("name", ["kpi-wall.json", "campaign.json", "pipeline.json"])
def test_sdk_model_round_trips_every_key(name: str) -> None:
    """Every key is one the SDK's schema knows: unknown ones would be dropped on the way."""
    data = load_dashboards()[name]
    assert _round_trip(data) == data


def test_round_trip_catches_an_unknown_option() -> None:
    data = copy.deepcopy(load_dashboards()["kpi-wall.json"])
    data["panels"][0]["options"]["showPercentChang"] = True  # a typo Grafana would ignore
    assert _round_trip(data) != data
