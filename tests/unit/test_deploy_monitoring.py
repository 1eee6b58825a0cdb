"""deploy/prometheus/alerts.yml and deploy/grafana/tusingest.json name only series the node exports
(read from a built app's own /metrics text), and promtool accepts the rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures.server import base_settings
from tests.metrics_text import samples
from tusingest.app import build_app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAME = re.compile(r"\bartstore_ingester_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def exported(tmp_path: Path) -> set[str]:
    settings = base_settings(tmp_path, f"sqlite:///{tmp_path / 's.db'}")
    Path(settings.staging_dir).mkdir(parents=True)
    app = build_app(settings)
    text = app.state.parts.metrics.render().decode()
    names = set(re.findall(r"^# TYPE (\S+)", text, re.MULTILINE))
    names |= {name for name, _ in samples(text)}
    return names | {name + suffix for name in names for suffix in (*HISTOGRAM_SUFFIXES, "_total")}


def rule_exprs() -> list[str]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    document = json.loads((DEPLOY / "grafana" / "tusingest.json").read_text())
    return [target["expr"] for panel in document["panels"] for target in panel["targets"]]


@pytest.mark.parametrize("exprs", [rule_exprs, dashboard_exprs], ids=["alerts", "dashboard"])
def test_every_expression_names_exported_series(exprs: object, tmp_path: Path) -> None:
    names = exported(tmp_path)
    found = exprs()  # type: ignore[operator]
    assert found
    for expr in found:
        used = set(NAME.findall(expr))
        assert used, expr
        assert used <= names, f"{expr}: {sorted(used - names)} not exported"


def test_the_alerts_cover_what_operators_must_hear_of() -> None:
    joined = " ".join(rule_exprs())
    for series in (
        'artstore_ingester_uploads_total{status="failure"}',
        "artstore_ingester_circuit_breaker_state",
        "artstore_ingester_saga_compensations_total",
        "artstore_ingester_staging_free_bytes",
        "artstore_ingester_outbox_backlog",
    ):
        assert series in joined


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is not on PATH (apt-get install prometheus)"
    checked = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
