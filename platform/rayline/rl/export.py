"""DQN policies out of rayline: ONNX, observations in, the greedy action and the Q-values
out, with a dynamic batch axis (rayline.export)."""

from __future__ import annotations

import os

import torch

POLICY_FILE = "policy.onnx"


class GreedyPolicy(torch.nn.Module):
    """What the served route answers: each observation's greedy action and Q-values."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_values = self.network(observations)
        return q_values.argmax(dim=1), q_values


def onnx_policy(policy, folder: str) -> list[str]:
    """The served policy (rayline.rl.predictor.DQNPolicy) as `policy.onnx`: input
    `observations` FP32 [batch, *obs] (UINT8 for image stacks, scaled inside the graph
    as the network does), outputs `actions` INT64 [batch] and `q_values` FP32 [batch,
    actions]."""
    import warnings

    images = policy.spec.byte_observations()
    example = torch.zeros(2, *policy.spec.obs_shape, dtype=torch.uint8 if images else None)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings():  # the exporter's notes on its own internals
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            GreedyPolicy(policy.network).eval(),
            (example,),
            input_names=["observations"],
            output_names=["actions", "q_values"],
            dynamic_shapes={"observations": {0: batch}},
            dynamo=True,
            verbose=False,
        )
    program.save(os.path.join(folder, POLICY_FILE))
    return [POLICY_FILE]
