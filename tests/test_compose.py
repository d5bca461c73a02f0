"""Static checks of docker-compose.yml, the Dockerfile and Grafana provisioning.

No Docker and no network: the compose file is validated against the Compose
Specification's JSON Schema (``../shared/schemas/compose-spec.json``) and then
checked for the things `docker compose config` would not catch: mounts of files
that do not exist, ``depends_on`` waiting on a service without a health check,
secrets written into the file, and a worker that cannot be scaled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "compose-spec.json"
DATASOURCE_FILE = REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_FILE = REPO / "grafana" / "provisioning" / "dashboards" / "kpimon.yml"

EXPECTED_SERVICES = {"kafka", "worker", "simulator", "prometheus", "alertmanager", "grafana"}
DEPENDS_ON_CONDITIONS = {
    "service_started",
    "service_healthy",
    "service_completed_successfully",
}
# A value that is exactly one `${VAR}` / `${VAR:-default}` / `${VAR?err}` substitution.
_SUBSTITUTION = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\}$")
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|WEBHOOK|API_?KEY|CREDENTIAL", re.I)
# Shapes of secrets that must never be literal anywhere in the file.
_SECRET_VALUE = re.compile(
    r"hooks\.slack\.com/"  # Slack incoming webhook
    r"|xox[abposr]-"  # Slack token
    r"|[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"  # credentials in a URL
    r"|-----BEGIN [A-Z ]*PRIVATE KEY",
    re.I,
)


# --------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as a mapping, whichever of the two forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    pairs = (str(item).partition("=") for item in env)
    return {key: value for key, _, value in pairs}


def bind_sources(service: dict[str, Any]) -> list[str]:
    """Host paths of a service's bind mounts (short and long volume syntax)."""
    sources: list[str] = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source = volume.split(":", 1)[0]
            if ":" in volume and source.startswith((".", "/", "~")):
                sources.append(source)
        elif volume.get("type") == "bind":
            sources.append(str(volume["source"]))
    return sources


def named_volume_sources(service: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source = volume.split(":", 1)[0]
            if ":" in volume and not source.startswith((".", "/", "~", "$")):
                names.append(source)
        elif volume.get("type") == "volume" and volume.get("source"):
            names.append(str(volume["source"]))
    return names


def literal_secret_problems(env: dict[str, str]) -> list[str]:
    """Variables that hold a literal secret instead of a `${...}` substitution."""
    problems: list[str] = []
    for key, value in env.items():
        if _SECRET_VALUE.search(value):
            problems.append(f"{key} holds a literal secret-looking value")
        elif _SECRET_NAME.search(key) and value and not _SUBSTITUTION.match(value):
            problems.append(f"{key} must be set via ${{...}} substitution, not a literal")
    return problems


def healthcheck_enabled(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck")
    if not isinstance(check, dict) or check.get("disable"):
        return False
    test = check.get("test")
    return bool(test) and test != ["NONE"]


def build_dockerfile(service: dict[str, Any]) -> Path:
    build = service["build"]
    if isinstance(build, str):
        return REPO / build / "Dockerfile"
    context = str(build.get("context", "."))
    return REPO / context / str(build.get("dockerfile", "Dockerfile"))


def host_port_published(port: Any) -> bool:
    """Whether a `ports` entry binds a fixed host port (which cannot be scaled)."""
    if isinstance(port, dict):
        return port.get("published") not in (None, "")
    text = str(port).split("/", 1)[0]
    return ":" in text


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = compose.get("services")
    assert isinstance(result, dict), "docker-compose.yml has no services mapping"
    return result


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    if not SCHEMA_FILE.is_file():
        pytest.fail(f"compose JSON schema missing: {SCHEMA_FILE}")
    data = load_yaml(SCHEMA_FILE)  # JSON is YAML
    assert isinstance(data, dict)
    return data


# --------------------------------------------------------------------------- schema


def test_schema_is_draft7(schema: dict[str, Any]) -> None:
    # Draft7Validator is used below because this is the draft the schema names.
    assert "draft-07" in str(schema.get("$schema")), "expected the compose spec's draft-07 schema"


def test_compose_matches_compose_spec(compose: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: [str(p) for p in e.absolute_path])
    messages = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    assert not messages, "\n".join(messages)


def test_schema_rejects_a_broken_compose_file(schema: dict[str, Any]) -> None:
    broken = {"services": {"worker": {"build": ".", "depends_on": {"kafka": {"condition": 1}}}}}
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


# --------------------------------------------------------------------------- services


def test_service_set(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == EXPECTED_SERVICES


def test_simulator_only_in_demo_profile(services: dict[str, dict[str, Any]]) -> None:
    assert services["simulator"].get("profiles") == ["demo"]
    unprofiled = {name for name, svc in services.items() if not svc.get("profiles")}
    assert unprofiled == EXPECTED_SERVICES - {"simulator"}


def test_image_pins(services: dict[str, dict[str, Any]]) -> None:
    images = {name: svc.get("image") for name, svc in services.items() if "image" in svc}
    assert images == {
        "kafka": "apache/kafka:3.9.1",
        "prometheus": "prom/prometheus:v2.53.0",
        "alertmanager": "prom/alertmanager:v0.27.0",
        "grafana": "grafana/grafana:11.3.0",
    }


@pytest.mark.parametrize("name", ["worker", "simulator"])
def test_build_context_has_dockerfile(services: dict[str, dict[str, Any]], name: str) -> None:
    assert "build" in services[name], f"{name} must be built from this repository"
    dockerfile = build_dockerfile(services[name])
    assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"


def test_bind_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    missing: list[str] = []
    for name, service in services.items():
        for source in bind_sources(service):
            path = Path(source)
            assert not path.is_absolute() and not source.startswith("~"), (
                f"{name}: bind mount {source} is outside the repository"
            )
            if not (REPO / path).exists():
                missing.append(f"{name}: {source}")
    assert not missing, "bind-mounted paths missing from the repository: " + ", ".join(missing)


def test_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    used = {v for service in services.values() for v in named_volume_sources(service)}
    assert used <= declared, f"undeclared named volumes: {sorted(used - declared)}"


def test_kafka_keeps_data_in_a_named_volume(services: dict[str, dict[str, Any]]) -> None:
    env = environment_of(services["kafka"])
    mounts = {str(v).split(":")[1] for v in services["kafka"].get("volumes") or []}
    assert env["KAFKA_LOG_DIRS"] in mounts
    assert named_volume_sources(services["kafka"]), "kafka data must survive re-creation"


# --------------------------------------------------------------------------- depends_on


def test_depends_on_uses_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on must use the long form"
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = (spec or {}).get("condition")
            assert condition in DEPENDS_ON_CONDITIONS, f"{name} -> {target}: no valid condition"
            if condition == "service_healthy":
                assert healthcheck_enabled(services[target]), (
                    f"{name} waits for {target} to be healthy but {target} has no healthcheck"
                )


@pytest.mark.parametrize(
    ("service", "needs"),
    [
        ("worker", "kafka"),
        ("simulator", "kafka"),
        ("prometheus", "alertmanager"),
        ("grafana", "prometheus"),
    ],
)
def test_start_order(services: dict[str, dict[str, Any]], service: str, needs: str) -> None:
    condition = (services[service].get("depends_on") or {}).get(needs, {}).get("condition")
    assert condition == "service_healthy"


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES - {"simulator"}))
def test_long_running_services_have_healthchecks(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    assert healthcheck_enabled(services[name])


def test_healthcheck_helper_sees_disabled_checks() -> None:
    assert not healthcheck_enabled({})
    assert not healthcheck_enabled({"healthcheck": {"disable": True, "test": ["CMD", "true"]}})
    assert not healthcheck_enabled({"healthcheck": {"test": ["NONE"]}})
    assert healthcheck_enabled({"healthcheck": {"test": ["CMD", "true"]}})


# --------------------------------------------------------------------------- secrets


def test_no_literal_secrets_in_environment(services: dict[str, dict[str, Any]]) -> None:
    problems = [
        f"{name}: {problem}"
        for name, service in services.items()
        for problem in literal_secret_problems(environment_of(service))
    ]
    assert not problems, "\n".join(problems)


def test_no_secret_shapes_anywhere_in_file() -> None:
    match = _SECRET_VALUE.search(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert match is None, f"docker-compose.yml contains a literal secret: {match and match[0]}"


def test_slack_webhook_passed_through_from_host(services: dict[str, dict[str, Any]]) -> None:
    env = environment_of(services["worker"])
    assert env["KPIMON_SLACK_WEBHOOK_URL"] == "${KPIMON_SLACK_WEBHOOK_URL:-}"


@pytest.mark.parametrize(
    "env",
    [
        {"KPIMON_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/XXXX"},
        {"GF_SECURITY_ADMIN_PASSWORD": "hunter2"},
        {"DATABASE_URL": "postgres://user:pw@db:5432/x"},
        {"SOME_API_KEY": "abc${X}"},
    ],
)
def test_secret_check_flags_literals(env: dict[str, str]) -> None:
    assert literal_secret_problems(env)


@pytest.mark.parametrize(
    "env",
    [
        {"KPIMON_SLACK_WEBHOOK_URL": "${KPIMON_SLACK_WEBHOOK_URL:-}"},
        {"GF_SECURITY_ADMIN_PASSWORD": "${GRAFANA_ADMIN_PASSWORD:-admin}"},
        {"KPIMON_SLACK_WEBHOOK_URL": ""},
        {"KPIMON_ALERTMANAGER_URL": "http://alertmanager:9093"},
    ],
)
def test_secret_check_accepts_substitutions(env: dict[str, str]) -> None:
    assert literal_secret_problems(env) == []


# --------------------------------------------------------------------------- worker


def test_worker_is_scalable(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container_name prevents --scale"
    assert "hostname" not in worker, "a fixed hostname would give every replica one worker id"
    fixed = [p for p in worker.get("ports") or [] if host_port_published(p)]
    assert not fixed, f"host port mappings prevent --scale: {fixed}"


@pytest.mark.parametrize(
    ("port", "published"),
    [
        ("9108", False),
        (9108, False),
        ("9108:9108", True),
        ("127.0.0.1:9108:9108/tcp", True),
        ({"target": 9108}, False),
        ({"target": 9108, "published": "9108"}, True),
    ],
)
def test_host_port_detection(port: Any, published: bool) -> None:
    assert host_port_published(port) is published


def test_worker_environment(services: dict[str, dict[str, Any]]) -> None:
    env = environment_of(services["worker"])
    assert env["KPIMON_KAFKA_BOOTSTRAP"] == "kafka:29092"
    assert env["KPIMON_METRICS_PORT"] == "9108"
    assert env["KPIMON_STATE_DIR"] == "/data"
    assert env["KPIMON_ALERTMANAGER_URL"] == "http://alertmanager:9093"
    assert env["KPIMON_GRAFANA_URL"] == "http://localhost:3000"


def test_worker_healthcheck_probes_its_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    port = environment_of(services["worker"])["KPIMON_METRICS_PORT"]
    test = services["worker"]["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else str(test)
    assert f"http://localhost:{port}/metrics" in command


@pytest.mark.parametrize("name", ["worker", "simulator"])
def test_bootstrap_is_an_advertised_kafka_listener(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    bootstrap = environment_of(services[name])["KPIMON_KAFKA_BOOTSTRAP"]
    advertised = environment_of(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    addresses = {item.split("://", 1)[1] for item in advertised.split(",")}
    assert bootstrap in addresses


def test_worker_urls_name_compose_services(services: dict[str, dict[str, Any]]) -> None:
    url = environment_of(services["worker"])["KPIMON_ALERTMANAGER_URL"]
    assert urlsplit(url).hostname in services


def test_simulator_command(services: dict[str, dict[str, Any]]) -> None:
    """History first, then live traffic with an incident; each step is a valid CLI call."""
    import shlex

    from stream.cli import build_parser
    from stream.simulate import Incident

    command = services["simulator"]["command"]
    assert command[:2] == ["sh", "-c"]
    steps = [shlex.split(step) for step in command[2].split("&&")]
    assert [step[:2] for step in steps] == [["kpimon", "simulate"]] * 2
    history, live = (build_parser().parse_args(step[1:]) for step in steps)
    assert history.start_ago == history.duration == "70m" and not history.incident
    assert live.start_ago is None and (live.seed, live.rate) == (history.seed, history.rate)
    (incident,) = live.incident
    assert Incident.parse(incident).kind == "ctr_drop"


# --------------------------------------------------------------------------- kafka


def test_kafka_kraft_single_node(services: dict[str, dict[str, Any]]) -> None:
    env = environment_of(services["kafka"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[key] == "1", key
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "true"


def test_kafka_listeners_are_consistent(services: dict[str, dict[str, Any]]) -> None:
    env = environment_of(services["kafka"])
    protocol_map = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    listener_names = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    advertised = {item.split("://")[0] for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    assert listener_names <= set(protocol_map)
    assert advertised <= listener_names
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    assert "localhost:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "9092:9092" in [str(p) for p in services["kafka"].get("ports") or []]


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_runs_worker_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    stages = re.split(r"(?im)^FROM\s", text)
    final = stages[-1]
    assert final.lstrip().startswith("python:3.11-slim")
    users = re.findall(r"(?im)^USER\s+(\S+)", final)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"(?im)^EXPOSE\s+9108\b", final)
    assert re.search(r'(?im)^CMD\s+\["kpimon",\s*"worker"\]', final)
    assert re.search(r"(?im)pip install\b.*\s\.(\s|$)", text), "must install the project itself"


def test_dockerignore_keeps_context_small() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".kpimon"} <= entries


# --------------------------------------------------------------------------- Grafana


def test_grafana_datasource_provisioning(services: dict[str, dict[str, Any]]) -> None:
    data = load_yaml(DATASOURCE_FILE)
    assert data["apiVersion"] == 1
    (datasource,) = data["datasources"]
    assert datasource["uid"] == "kpimon-prometheus"
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True
    assert datasource["editable"] is False
    url = urlsplit(datasource["url"])
    assert url.hostname in services, "datasource must point at the compose prometheus service"
    assert f"{url.port}:{url.port}" in [str(p) for p in services["prometheus"]["ports"]]


def test_grafana_dashboard_provider(services: dict[str, dict[str, Any]]) -> None:
    data = load_yaml(DASHBOARD_PROVIDER_FILE)
    assert data["apiVersion"] == 1
    (provider,) = data["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "kpimon"
    assert provider["disableDeletion"] is True
    assert provider["updateIntervalSeconds"] == 30
    path = provider["options"]["path"]
    mounted = {
        str(v).split(":")[1]: str(v).split(":")[0] for v in services["grafana"].get("volumes", [])
    }
    assert mounted.get(path) == "./grafana/dashboards", "provider path must be the mounted dir"


def test_grafana_home_dashboard_is_inside_provisioned_dir(
    services: dict[str, dict[str, Any]],
) -> None:
    env = environment_of(services["grafana"])
    provider_path = load_yaml(DASHBOARD_PROVIDER_FILE)["providers"][0]["options"]["path"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(provider_path)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_grafana_provisioning_mount_is_read_only(services: dict[str, dict[str, Any]]) -> None:
    volumes = [str(v) for v in services["grafana"].get("volumes", [])]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
