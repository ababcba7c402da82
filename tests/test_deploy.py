"""deploy/: the KubeRay manifests against KubeRay's own v1 CRD schemas (vendored in
tests/kuberay/, unknown fields are errors), the operator's rules a schema cannot see,
and the image recipe they name."""

import copy
import gzip
import json
import re
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml

from rayline.config import from_dict
from rayline.memory import ALLOCATOR_ENV
from rayline.serving.settings import ServeArgs, direct_ingress_env

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "deploy" / "kuberay"
PODMONITOR = KUBERAY / "podmonitor.yaml"
MANIFESTS = sorted(path for path in KUBERAY.glob("*.yaml") if path != PODMONITOR)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields as errors: objects that list their properties
    and do not preserve unknown fields get additionalProperties: false."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
                and "additionalProperties" not in node
            ):
                node["additionalProperties"] = False
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def schemas() -> dict:
    with gzip.open(ROOT / "tests" / "kuberay" / "crd_schemas.json.gz", "rt") as f:
        return {kind: strict(schema) for kind, schema in json.load(f).items()}


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def pod_templates(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_the_strict_schema_refuses_an_unknown_field(schemas):
    doc = manifest("rayservice.yaml")
    cluster_spec(doc)["headGroupSpec"]["rayStartParam"] = {}  # a typo the operator would drop
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        jsonschema.validate(doc, schemas["RayService"])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_match_kuberay_v1_crds(schemas, path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, schemas[doc["kind"]])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_operator_rules(path):
    doc = yaml.safe_load(path.read_text())
    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]
    # The operator reaches the dashboard through the head Service: not loopback.
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") != "127.0.0.1"
    assert head["rayStartParams"].get("num-cpus") == "0", "the head schedules nothing"
    # Token auth through the operator, which makes and hands out the token.
    assert spec["authOptions"]["mode"] == "token"
    for template in pod_templates(doc):
        for container in template["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert "RAY_AUTH_MODE" not in names, "set by the operator from authOptions"
            assert "RAYLINE_API_KEY" not in names, "the key is a mounted file, not an env var"
            assert re.fullmatch(rf".*/rayline:{re.escape(VERSION)}-(cpu|gpu)", container["image"])
            limits = container["resources"]["limits"]
            assert container["resources"]["requests"] == limits
            assert ("-gpu" in container["image"]) == ("nvidia.com/gpu" in limits)
    # Declared head ports become the head Service's: all of them or none.
    (head_container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_container.get("ports", [])}
    if ports:
        assert {"gcs-server", "dashboard", "client"} <= set(ports), ports
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "gpu" in groups and "cpu" in groups


DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
RELABELING = {
    "type": "object",
    "properties": {
        "action": {"type": "string"},
        "modulus": {"type": "integer"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
    },
}
PODMONITOR_SCHEMA = strict(
    {  # the fields rayline's manifest may use, as the Prometheus operator's v1 PodMonitor
        # CRD (operator 0.91) declares them: names, types, patterns and required fields
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "spec": {
                "type": "object",
                "required": ["selector"],
                "properties": {
                    "selector": LABEL_SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "jobLabel": {"type": "string"},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": {"type": "string", "minLength": 1},
                                "portNumber": {"type": "integer", "minimum": 1},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                                "interval": {"type": "string", "pattern": DURATION},
                                "scrapeTimeout": {"type": "string", "pattern": DURATION},
                                "relabelings": {"type": "array", "items": RELABELING},
                                "metricRelabelings": {"type": "array", "items": RELABELING},
                            },
                        },
                    },
                },
            },
        },
    }
)


def test_the_podmonitor_scrapes_every_ray_node_on_the_port_its_pods_name_as_job_ray():
    doc = yaml.safe_load(PODMONITOR.read_text())
    jsonschema.validate(doc, PODMONITOR_SCHEMA)
    typo = copy.deepcopy(doc)
    typo["spec"]["podMetricsEndpoints"][0]["targetPort"] = 8080  # removed from the CRD
    with pytest.raises(jsonschema.ValidationError, match="targetPort"):
        jsonschema.validate(typo, PODMONITOR_SCHEMA)
    (endpoint,) = doc["spec"]["podMetricsEndpoints"]
    # The rules and the dashboard ask for job="ray", as Ray's own discovery file names it.
    assert {"targetLabel": "job", "replacement": "ray"} in endpoint["relabelings"]
    assert doc["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    for path in MANIFESTS:  # every Ray container names the port the endpoint scrapes
        for template in pod_templates(yaml.safe_load(path.read_text())):
            for container in template["spec"]["containers"]:
                ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
                # a head that declares none gets KubeRay's defaults, metrics among them
                assert not ports or ports.get(endpoint["port"]) == 8080, (path.name, ports)


def test_the_rayservice_serves_the_fast_path_with_a_required_key_in_every_pod():
    doc = manifest("rayservice.yaml")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    args = serve_config["applications"][0]["args"]
    from_dict(ServeArgs, args)
    (head_container,) = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports["serve"] == args["front_port"]
    assert serve_config["http_options"]["port"] == args["front_port"] + 100
    wanted_env = direct_ingress_env(args["front_port"])
    for template in pod_templates(doc):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert {k: env.get(k) for k in wanted_env} == wanted_env
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-key"]
        secret = volumes["api-key"]["secret"]
        assert secret["optional"] is False and secret["secretName"] == "rayline-api-key"
        assert args["api_key_file"].startswith(mount["mountPath"] + "/")


def test_the_rayjob_runs_a_built_in_pipeline_sized_for_it():
    from rayline.pipelines import builtin_pipelines, load_pipeline

    doc = manifest("rayjob-dqn.yaml")
    words = doc["spec"]["entrypoint"].split()
    assert words[:2] == ["rayline", "train"] and words[2] in builtin_pipelines()
    _, cfg = load_pipeline(words[2], {})
    groups = {g["groupName"]: g for g in cluster_spec(doc)["workerGroupSpecs"]}
    cpus = groups["cpu"]["maxReplicas"] * int(
        groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    )
    assert cpus >= cfg.collectors.num_collectors * cfg.collectors.num_cpus
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= cfg.learner.num_gpus


def test_every_long_lived_process_gets_the_allocator_cap():
    """rayline.memory.ALLOCATOR_ENV wherever a deployment starts serving replicas or a
    training run's actors: the code's defaults do not reach them there."""
    runtime_env = yaml.safe_load((ROOT / "deploy" / "runtime-env.yaml").read_text())
    assert ALLOCATOR_ENV.items() <= runtime_env["env_vars"].items()
    serve_yaml = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    service = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    for config in (serve_yaml, service):
        (gateway,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Gateway"]
        env_vars = gateway["ray_actor_options"]["runtime_env"]["env_vars"]
        assert ALLOCATOR_ENV.items() <= env_vars.items()
    for template in pod_templates(manifest("rayjob-dqn.yaml")):
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert ALLOCATOR_ENV.items() <= env.items()


def test_the_image_recipe_matches_ray_and_torch():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"ARG RAY_IMAGE=rayproject/ray:2\.60\.\d+-py3\d+-cpu", dockerfile)
    assert "rayproject/ray:2.60.0-py311-gpu" in dockerfile
    makefile = (ROOT / "Makefile").read_text()
    torch_pins = re.search(r"TORCH_PINS := (.*)", makefile).group(1).split()
    for pin in torch_pins:
        assert f'"{pin}"' in dockerfile, pin
    assert f"rayline:{VERSION}-cpu" in dockerfile and f"rayline:{VERSION}-gpu" in dockerfile
