"""The DQN family's HTTP route: POST /dqn/{model}/act, observation(s) -> greedy action(s)
and Q-values. Concurrent requests to one policy share one forward pass."""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
import functools
from typing import Any

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, Field

from rayline.serving.base import BadInput, TooLarge
from rayline.serving.http import ERRORS, Models, ModelsDep, json_response, refused

KIND = "dqn"


MAX_OBSERVATIONS = 1024
"""Observations in one request (a batch): more is refused by the schema (422) before any
number is looked at."""
HEAVY_OBSERVATIONS = 64
"""A request of more observations whose forward pass takes a thread (a conv policy) runs
on the model's heavy lane (rayline.serving.work)."""
INLINE_CHECK_NUMBERS = 4096
"""A body with more numbers than this is checked in a worker thread: the check of every
number costs about 0.17 s a MiB, which on the event loop would stall every route."""


class ActRequest(BaseModel):
    observations: list[Any] = Field(
        min_length=1,
        max_length=MAX_OBSERVATIONS,
        description="one observation, or a batch of at most 1,024: JSON numbers within "
        "float32's range",
    )


class ActResponse(BaseModel):
    model: str
    version: int
    actions: list[int]
    q_values: list[list[float]]


async def acted(models: Models, policy, observations: np.ndarray) -> dict:
    """The policy's answer, computed here when that is cheaper than a thread hop
    (DQNPolicy.cheap), else in the model's worker threads."""
    if policy.cheap(len(observations)):
        return policy.act(observations)
    heavy = len(observations) > HEAVY_OBSERVATIONS
    return await models.run(policy.version.name, policy.act, observations, heavy=heavy)


async def act_batch(models: Models, requests: list) -> list:
    """(policy, observations) requests answered with one forward pass per policy
    version."""
    groups: dict = {}
    for i, (policy, _) in enumerate(requests):
        groups.setdefault(id(policy), (policy, []))[1].append(i)
    answers: list = [None] * len(requests)
    for policy, members in groups.values():
        batch = np.concatenate([requests[i][1] for i in members])
        result = await acted(models, policy, batch)
        start = 0
        for i in members:
            size = len(requests[i][1])
            answers[i] = {
                "version": policy.version.version,
                "actions": result["actions"][start : start + size],
                "q_values": result["q_values"][start : start + size],
            }
            start += size
    return answers


async def answer_act(
    models: Models, model: str, observations: list | np.ndarray, version: int | None = None
) -> dict:
    """{"version", "actions", "q_values"} for observations: JSON's nested lists (checked
    here, in a thread when they are many), or the protocol's checked array; `version`:
    the one a protocol route asked for."""
    policy = models.local(model, KIND, version=version)
    if policy is None:  # held in a deployment of its own
        version, answer = await models.call(model, KIND, "act", observations, version=version)
        return {"version": version, **answer}
    try:
        if isinstance(observations, np.ndarray):
            observations = policy.check(observations)
        else:
            rows = len(observations) if isinstance(observations[0], list) else 1
            if rows * policy.numbers_per_observation <= INLINE_CHECK_NUMBERS:
                observations = policy.check(observations)
            else:
                check = policy.check
                observations = await models.run(model, check, observations, heavy=True)
    except BadInput as exc:
        raise refused(exc) from None
    if not models.batching:
        answer = await models.answer(acted(models, policy, observations))
        models.shadow(model, "act", (observations,), answer)
        return {"version": policy.version.version, **answer}
    # Big requests are batched apart from small ones: a batch holding one goes to the
    # heavy lane's idle-class thread, and small requests in it waited there too (beside
    # benchmarks/hostile.py's 1,024 observations, DQN's p99 was 2.5x its p99 alone).
    big = len(observations) > HEAVY_OBSERVATIONS
    batcher = models.batcher(
        f"{KIND} (big)" if big else KIND, functools.partial(act_batch, models), max_batch=32
    )
    answer = await models.answer(batcher.submit((policy, observations)))
    models.shadow(model, "act", (observations,), answer)
    return answer


async def infer(
    models: Models, model: str, inputs: dict, parameters: dict, version: int | None
) -> tuple[int, dict]:
    """The Open Inference Protocol's answer: observations FP32 [N, *obs] -> actions
    INT64 [N] and q_values FP32 [N, actions]."""
    observations = inputs.get("observations")
    if observations is None or len(inputs) != 1:
        raise BadInput(f"inputs: expected one tensor, observations (got {', '.join(inputs)})")
    if observations.ndim < 2:
        raise BadInput(f"observations: expected shape [N, ...], got {list(observations.shape)}")
    if len(observations) > MAX_OBSERVATIONS:
        raise TooLarge(f"observations: {len(observations)} rows, at most {MAX_OBSERVATIONS}")
    answer = await answer_act(models, model, observations, version)
    outputs = {
        "actions": np.asarray(answer["actions"], dtype=np.int64),
        "q_values": np.asarray(answer["q_values"], dtype=np.float32),
    }
    return answer["version"], outputs


def protocol():
    from rayline.serving.inference_protocol import KindProtocol

    return KindProtocol("rayline_dqn", {"observations": ("FP32", "UINT8")}, infer)


def router() -> APIRouter:
    routes = APIRouter(tags=["dqn"])

    @routes.post("/dqn/{model}/act", response_model=ActResponse, responses=ERRORS)
    async def act(model: str, body: ActRequest, models: ModelsDep):
        answer = await answer_act(models, model, body.observations)
        return json_response({"model": model, **answer})

    return routes
