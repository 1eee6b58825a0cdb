"""The deploy files are valid and say what docs/deployment.md promises: the Kubernetes manifests
pass the API schemas bundled with kubernetes-validate (strict, no network), deploy/compose.yaml
passes the compose-spec schema (vendored in tests/unit/schemas/, from compose-spec/compose-spec),
nginx accepts deploy/nginx/nginx.conf (`nginx -t`), and the pieces fit together (selectors,
probes, upstream names). Each validator is also shown a broken copy, which it must refuse."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
KUBERNETES_VERSION = "1.31.0"  # the oldest the manifests need: the preStop `sleep` action is 1.30+


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object under deploy/kubernetes/, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"two {document['kind']} objects"
            found[document["kind"]] = document
    return found


def k8s_valid(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kind", sorted(manifests()))
def test_each_kubernetes_manifest_passes_the_api_schema_strictly(kind: str) -> None:
    k8s_valid(manifests()[kind])


def test_the_kubernetes_validator_refuses_a_misspelt_field_and_a_wrong_type() -> None:
    deployment = manifests()["Deployment"]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            k8s_valid(broken)


def test_the_kubernetes_objects_are_all_there_and_refer_to_each_other() -> None:
    objects = manifests()
    assert set(objects) >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
        "Job",
        "PersistentVolumeClaim",
    }
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]

    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["args"] == ["tusingest", "serve", "--host", "0.0.0.0", "--port", "8020"]
    assert {ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]} == {
        objects["ConfigMap"]["metadata"]["name"],
        objects["Secret"]["metadata"]["name"],
    }
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {objects["PersistentVolumeClaim"]["metadata"]["name"]}
    assert "ReadWriteMany" in objects["PersistentVolumeClaim"]["spec"]["accessModes"]  # shared staging
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    grace = float(objects["ConfigMap"]["data"]["SHUTDOWN_GRACE_SECONDS"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace
    job = objects["Job"]["spec"]["template"]["spec"]
    assert job["containers"][0]["command"] == ["tusingest", "migrate"]
    assert json.loads(objects["ConfigMap"]["data"]["elements.json"])["storage_elements"]


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return document


def compose_valid(document: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.validate(document, schema, cls=jsonschema.Draft7Validator)


def test_the_compose_file_passes_the_compose_spec_schema() -> None:
    compose_valid(compose())


def test_the_compose_schema_refuses_an_unknown_service_key_and_a_bad_condition() -> None:
    unknown = compose()
    unknown["services"]["nginx"]["restart_policy"] = "always"
    bad_condition = compose()
    bad_condition["services"]["ingester-1"]["depends_on"]["migrate"]["condition"] = "service_finished"
    for broken in (unknown, bad_condition):
        with pytest.raises(jsonschema.ValidationError):
            compose_valid(broken)


def upstream_servers(nginx_conf: str) -> list[str]:
    upstream = re.search(r"upstream tusingest \{(.*?)\}", nginx_conf, re.DOTALL)
    assert upstream is not None
    return re.findall(r"^\s*server\s+(\S+)", upstream.group(1), re.MULTILINE)


def test_compose_runs_three_identical_nodes_behind_nginx_after_the_migration() -> None:
    services = compose()["services"]
    nodes = sorted(name for name in services if name.startswith("ingester-"))
    assert len(nodes) == 3
    assert sorted(upstream_servers((DEPLOY / "nginx" / "nginx.conf").read_text())) == [f"{n}:8020" for n in nodes]
    assert {services[n]["environment"]["TRUST_PROXY_HEADERS"] for n in nodes} == {"true"}
    assert len({json.dumps(services[n], sort_keys=True) for n in nodes}) == 1  # one anchor, no drift
    for node in nodes:
        depends = services[node]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert set(depends) <= set(services)
    assert services["migrate"]["command"] == ["tusingest", "migrate"]
    assert {"postgres", "redis", "minio", "clamav", "nginx"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"


def nginx_t(conf: Path) -> subprocess.CompletedProcess[str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed (apt-get install nginx; .ci/run installs it)", pytrace=False)
    return subprocess.run([nginx, "-t", "-q", "-c", str(conf)], capture_output=True, text=True, timeout=30)


def loopback_copy(tmp_path: Path, text: str) -> Path:
    """deploy/nginx/ in ``tmp_path`` with the compose service names as loopback (`nginx -t`
    resolves upstream names, and these exist only inside compose's network)."""
    for path in (DEPLOY / "nginx").iterdir():
        shutil.copy(path, tmp_path / path.name)
    conf = tmp_path / "nginx.conf"
    conf.write_text(re.sub(r"ingester-\d+:", "127.0.0.1:", text))
    return conf


def test_nginx_accepts_the_deploy_config(tmp_path: Path) -> None:
    checked = nginx_t(loopback_copy(tmp_path, (DEPLOY / "nginx" / "nginx.conf").read_text()))
    assert checked.returncode == 0, checked.stderr


def test_nginx_refuses_a_broken_copy(tmp_path: Path) -> None:
    broken = (DEPLOY / "nginx" / "nginx.conf").read_text().replace("proxy_pass http://tusingest;", "proxy_pass;")
    checked = nginx_t(loopback_copy(tmp_path, broken))
    assert checked.returncode != 0 and "proxy_pass" in checked.stderr


def test_the_proxy_settings_stream_bodies_and_never_resend_a_patch_that_reached_a_node() -> None:
    text = (DEPLOY / "nginx" / "tusingest-proxy.conf").read_text()
    directives = dict(re.findall(r"^(\w+)\s+([^;]*);", text, re.MULTILINE))
    assert directives["proxy_request_buffering"] == "off"
    assert directives["client_max_body_size"] == "0"
    assert "non_idempotent" not in directives["proxy_next_upstream"]
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert int(directives[timeout].rstrip("s")) >= 600
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in text  # replaced, never appended to


def test_the_image_is_slim_non_root_with_libmagic_and_a_liveness_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert stages[-1].endswith("-slim")
    final = text.rsplit("\nFROM ", 1)[1]
    assert "libmagic1" in final and "--no-install-recommends" in final
    user = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health/live", final, re.MULTILINE)
    assert 'CMD ["tusingest", "serve", "--host", "0.0.0.0", "--port", "8020"]' in final
