"""The application as a cluster runs it (deploy/serve.yaml's args): a real two-node Ray
(`ray.cluster_utils.Cluster`) with the gateway replica on the worker node and rayline's
front on the head, answered over real HTTP through the front.

The cluster runs in a child process: the rest of the suite shares one local Ray."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PORT = 18160


def test_deploy_serve_yaml_configures_the_fast_path():
    """deploy/serve.yaml runs what `rayline serve` runs: the front on the advertised port,
    Serve's proxy (the front's backup) beside it, and Serve's direct ingress flags for
    that port in the environment the nodes are started with (its comment says so)."""
    from rayline.serving.settings import direct_ingress_env

    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    args = config["applications"][0]["args"]
    assert args["front_port"] and args["front_host"] == "127.0.0.1"
    assert config["http_options"]["port"] == args["front_port"] + 100
    text = (DEPLOY / "serve.yaml").read_text()
    for name, value in direct_ingress_env(args["front_port"]).items():
        assert f"{name}={value}" in text, name


@pytest.mark.cluster
@pytest.mark.slow
def test_a_replica_on_a_worker_node_answers_through_the_front(tmp_path):
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["serving_resource_in_use"], "the gateway replica is not on the worker node"
    assert answer["status"] == 200
    assert answer["actions"] == answer["expected_actions"]
    assert answer["front_lists_the_replica"]


def _serve_on_a_cluster(workdir: str) -> dict:
    import httpx
    import numpy as np
    import ray
    from ray import serve

    import oracles
    from rayline.serving.app import build_app
    from rayline.serving.settings import APP_NAME, direct_ingress_env
    from rayline.store import ModelRegistry
    from rayline.testing import serving_cluster
    from test_serving import register_policy

    registry = ModelRegistry(f"{workdir}/store")
    version = register_policy(registry, seed=3)
    registry.promote("cartpole", version.version)
    observations = [[0.1, -0.2, 0.03, 0.4], [-0.3, 0.2, 0.1, -0.05]]
    expected = oracles.dqn_q_values(registry.read_files(version), observations)
    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    with serving_cluster(direct_ingress_env(PORT), {"serving": 1}):
        serve.start(http_options={"host": "127.0.0.1", "port": PORT + 100})
        args = {
            **config["applications"][0]["args"],
            "store_uri": f"{workdir}/store",
            "front_port": PORT,
            "gateway_resources": {"serving": 1},
        }
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        front = serve.get_deployment_handle("Front", APP_NAME)
        deadline = time.monotonic() + 60
        while not front.addresses.remote().result() and time.monotonic() < deadline:
            time.sleep(0.5)
        listed = bool(front.addresses.remote().result())
        reply = httpx.post(
            f"http://127.0.0.1:{PORT}/dqn/cartpole/act",
            json={"observations": observations},
            timeout=30,
        )
        # The worker node alone has the resource, and the replica holds it.
        in_use = ray.cluster_resources()["serving"] == 1
        in_use = in_use and ray.available_resources().get("serving", 0) == 0
        serve.shutdown()
    return {
        "status": reply.status_code,
        "actions": reply.json().get("actions"),
        "expected_actions": np.argmax(expected, axis=1).tolist(),
        "serving_resource_in_use": in_use,
        "front_lists_the_replica": listed,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(json.dumps(_serve_on_a_cluster(sys.argv[1])))
