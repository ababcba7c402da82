"""One Ray Serve application for every registered model: `build_app` (the import path
rayline.serving.app:build_app of `serve run` / `serve deploy` and of `rayline serve`)
binds the gateway (rayline.serving.gateway) to the models that have the alias, with the
routes their families declare, and optionally rayline's front (rayline.serving.front)
and deployments of their own for heavy models. What it accepts: rayline.serving.settings.

Every input gets a 2xx or a 4xx: the request schemas are strict (numbers are JSON
numbers within float32's range, lists are not empty), the body limit is enforced while
the body is read (chunked or not), and every error status is in the OpenAPI document.
"""

from __future__ import annotations

import logging
import os

from ray import serve

from rayline.config import ConfigError, from_dict
from rayline.family import served_kinds
from rayline.memory import ALLOCATOR_ENV
from rayline.serving.front import Front
from rayline.serving.gateway import Gateway
from rayline.serving.model_server import ModelServer
from rayline.serving.settings import (
    APP_NAME,
    OWN_DEPLOYMENT_OPTIONS,
    ServeArgs,
    app_key_sha256,
    check_canaries,
    served_models,
)
from rayline.store import ModelRegistry

logger = logging.getLogger("ray.serve")


def with_serving_env(ray_actor_options: dict) -> dict:
    """`ray_actor_options` with rayline.memory.ALLOCATOR_ENV among its runtime env's
    variables (those it sets itself win)."""
    runtime_env = dict(ray_actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**ALLOCATOR_ENV, **(runtime_env.get("env_vars") or {})}
    return {**ray_actor_options, "runtime_env": runtime_env}


def build_app(args: dict) -> serve.Application:
    """The application for `serve run` / `serve deploy` (import path
    rayline.serving.app:build_app) and `rayline serve`, from `args` as `ServeArgs`: every
    model in the store that has the alias, or the listed `models`. With a key, every
    route but /healthz requires it as X-API-Key. A model whose metadata cannot be read is
    not served and is listed under `refused` by /models; the others are served."""
    settings = from_dict(ServeArgs, args)
    store_uri = settings.store_uri or os.environ.get("RAYLINE_STORE", "./artifacts")
    if "://" not in store_uri:
        store_uri = os.path.abspath(store_uri)  # replicas run in other working directories
    alias = settings.alias
    if settings.prediction_log.uri and "://" not in settings.prediction_log.uri:
        settings.prediction_log.uri = os.path.abspath(settings.prediction_log.uri)
    registry = ModelRegistry(store_uri, create=False, read_only=True)
    served = served_kinds()
    kinds, refused = served_models(registry, alias, settings.models, served)
    for name, reason in refused.items():
        logger.warning("rayline: not serving %s: %s", name, reason)
    user_config = {"ref": alias, "poll_s": settings.poll_s}
    logs = {"log_level": settings.log_level}
    front = None
    if settings.front_port:
        front = Front.options(logging_config=logs).bind(
            settings.front_host, settings.front_port, APP_NAME, settings.request_timeout_s
        )
    check_canaries(settings, kinds)
    own = {}
    for name, options in settings.own_deployments.items():
        unknown = set(options) - OWN_DEPLOYMENT_OPTIONS
        if unknown:
            raise ConfigError(
                f"own_deployments.{name}: unknown option(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(OWN_DEPLOYMENT_OPTIONS))})"
            )
        if name not in kinds:
            raise ConfigError(
                f"own_deployments.{name}: not a served model "
                f"(served: {', '.join(sorted(kinds)) or 'none'})"
            )
        options = {"ray_actor_options": {"num_cpus": 0}, **options}
        options["ray_actor_options"] = with_serving_env(options["ray_actor_options"])
        split = settings.canary_fraction.get(name) or name in settings.shadow
        own[name] = ModelServer.options(
            name=f"ModelServer-{name}", user_config=user_config, logging_config=logs, **options
        ).bind(store_uri, name, served[kinds[name]], settings.canary.alias if split else None)
    gateway = Gateway.options(
        num_replicas=settings.replicas,
        ray_actor_options=with_serving_env(
            {"num_cpus": 0, "resources": settings.gateway_resources}
        ),
        user_config=user_config,
        logging_config={**logs, "enable_access_log": settings.access_log},
    )
    settings.store_uri, settings.api_key_sha256 = store_uri, app_key_sha256(settings) or ""
    return gateway.bind(settings, kinds, served, refused, front, own)
