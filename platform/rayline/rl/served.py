"""What the DQN family serves (rayline.family.SERVING): light to import; torch is
imported when a replica loads a policy."""

from __future__ import annotations

from rayline.serving.base import ServedKind, post_example, share_equal
from rayline.store import ModelRegistry


def load_policy(registry: ModelRegistry, name: str, ref):
    from rayline.rl.predictor import DQNPolicy

    return DQNPolicy(registry, name, ref)


def routes():
    from rayline.rl.routes import router

    return router()


def protocol():
    from rayline.rl.routes import protocol

    return protocol()


def exports():
    from rayline.rl.export import onnx_policy

    return {"onnx": onnx_policy}


SERVED = {
    "dqn": ServedKind(
        "DQN policy",
        load_policy,
        routes,
        lambda url, name, version, registry: [
            post_example(f"{url}/dqn/{name}/act", '{"observations": [0.01, 0.02, 0.03, 0.04]}')
        ],
        agreement=lambda method, a, b: {"agreement": share_equal(a["actions"], b["actions"])},
        protocol=protocol,
        exports=exports,
    )
}
"""The DQN policy served (rayline.rl.predictor, rayline.rl.routes), loaded on use."""
