"""What `rayline serve`, deploy/serve.yaml and build_app accept, and the checks made on
it before Ray starts (`ServeArgs`, the served models, canaries, the API key, direct
ingress's settings). Light to import: the CLI refuses a bad flag without loading Serve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Literal

from rayline.config import ConfigError, bounded
from rayline.serving.base import ServedKind
from rayline.serving.canary import CanaryArgs
from rayline.serving.prediction_log import PredictionLogArgs
from rayline.store import ModelRegistry, RegistryError

MAX_BODY_BYTES = 1 << 20
"""Request bodies larger than this get 413 unless ServeArgs.max_body_bytes says more."""

APP_NAME = "rayline"
"""The application's name: `rayline serve`, deploy/serve.yaml and the front agree on it."""
API_KEY_ENV = "RAYLINE_API_KEY"
API_KEY_FILE_ENV = "RAYLINE_API_KEY_FILE"


SHUTDOWN_CHECK_S = 0.25
"""How often a replica that is stopping counts its requests in flight (Serve's
`graceful_shutdown_wait_loop_s`, 2 s by default): an idle replica stops after one check,
so a deleted app or a replaced replica was gone in 3.0 s with Serve's period, 1.3 s with
this one. Counting is cheap; requests in flight are still waited for."""

OWN_DEPLOYMENT_OPTIONS = {
    "num_replicas",
    "ray_actor_options",
    "autoscaling_config",
    "max_ongoing_requests",
}
"""What `own_deployments` may set for a model's deployment (Serve's own option names)."""


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve 2.60's direct ingress (docs/serving.md): each gateway replica
    answers HTTP itself on a port of `port + 1 .. port + 99` (bound to http_options.host),
    skipping Serve's Python proxy, which measured about 0.1x a plain FastAPI app here;
    rayline's front on `port` balances over them (rayline/serving/front.py). Serve reads
    these when it is imported, so they must be in the environment of the driver (before
    `import ray`) and of every replica (the cluster's runtime env). A dead replica's port
    is not quarantined (150 s by default), so a restarted one can take it again. The
    replica runs rayline's code on its own event loop rather than on a second one in
    another thread (Serve's default): one thread hop less per request, measured 560 ->
    785 requests a second at concurrency 1 (docs/benchmarks.md). The gateway keeps its
    loop free: every prediction runs in a worker thread."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 99),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    }


def api_key_sha256(api_key_file: str = "") -> str | None:
    """The SHA-256 of the API key, read where the app is built: from `api_key_file` (or
    the file $RAYLINE_API_KEY_FILE names), else from $RAYLINE_API_KEY. Only the hash
    reaches the replicas, never the key (runtime envs are logged in plain text). Fails
    closed: a key file named but unreadable or empty is an error, not an open app."""
    path = api_key_file or os.environ.get(API_KEY_FILE_ENV)
    if path:
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"api_key_file {path}: cannot be read ({exc.strerror})") from None
        if not key:
            raise ConfigError(f"api_key_file {path}: empty")
        return hashlib.sha256(key).hexdigest()
    key = os.environ.get(API_KEY_ENV)
    if key is not None:
        if not key.strip():
            raise ConfigError(f"${API_KEY_ENV} is set but empty")
        return hashlib.sha256(key.strip().encode()).hexdigest()
    return None


@dataclasses.dataclass
class ServeArgs:
    """What the application accepts: `rayline serve`, deploy/serve.yaml's `args` and
    build_app all read this one definition (unknown keys and bad values are refused)."""

    store_uri: str = ""
    """Model store URI; empty means $RAYLINE_STORE, else ./artifacts."""
    alias: str = "production"
    """Serve each model's version that has this alias."""
    models: list[str] = dataclasses.field(default_factory=list)
    """Model names to serve; empty means every model that has the alias."""
    poll_s: float = bounded(10.0, gt=0.0)
    """Seconds between checks of where each alias points."""
    batching: bool = True
    """Answer concurrent DQN requests in one forward pass, top-k requests in one hop."""
    request_timeout_s: float = bounded(30.0, gt=0.0)
    """Past this a request gets 504 and the replica goes on."""
    max_body_bytes: int = bounded(MAX_BODY_BYTES, ge=1)
    """Larger request bodies get 413, counted as they arrive."""
    api_key_file: str = ""
    """A file holding the API key (see `api_key_sha256`); empty: $RAYLINE_API_KEY_FILE or
    $RAYLINE_API_KEY, else no key."""
    api_key_sha256: str = ""
    """The key's SHA-256 (64 hex digits), from a caller that read the key itself: `rayline
    serve` reads it before Ray starts and takes $RAYLINE_API_KEY out of its environment,
    so that no Ray process holds the key. Set, it wins over `api_key_file`."""
    front_port: int = bounded(0, ge=0, le=65535)
    """Port of rayline's front (rayline/serving/front.py), the stable address before the
    gateway replicas' own ports (Serve's direct ingress must be on); 0: no front."""
    front_host: str = "127.0.0.1"
    """Interface the front listens on: loopback unless you mean to expose it."""
    replicas: int = bounded(1, ge=1)
    """Gateway replicas (deploy/serve.yaml's autoscaling_config overrides it)."""
    access_log: bool = False
    """Serve's line per request in the replica's log (and on `rayline serve`'s console).
    Off: it costs time on every request, and the front's health checks would fill it;
    rayline_requests counts every request by route and status either way."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Serve's log level in the application's replicas (their log files, and the console
    of `rayline serve`): WARNING keeps Serve's INFO lines of every start out; a warning
    or an error still shows."""
    gateway_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources each gateway replica needs: places replicas on the nodes that
    have them (a serving node group)."""
    own_deployments: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Model name -> options of a deployment of its own (`ModelServer-NAME`):
    num_replicas, ray_actor_options (e.g. {num_gpus: 1}), autoscaling_config,
    max_ongoing_requests. For heavy models (vision on GPU replicas) beside the small ones
    the gateway replicas hold; the routes stay the same."""
    canary_fraction: dict[str, float] = dataclasses.field(default_factory=dict)
    """Model name -> share (0..1) of its requests for the version its canary alias
    points at (rayline/serving/canary.py); while the alias is unset, or points at the
    serving version, every request goes to the serving version."""
    canary: CanaryArgs = dataclasses.field(default_factory=CanaryArgs)
    """How canaries are judged and rolled back."""
    shadow: list[str] = dataclasses.field(default_factory=list)
    """Models whose canary gets a copy of every request instead of a share: the serving
    version answers, the canary's answer is compared off the request path (agreement
    metrics), never returned."""
    prediction_log: PredictionLogArgs = dataclasses.field(default_factory=PredictionLogArgs)
    """A sample of the model routes' requests and answers, as Parquet files
    (rayline/serving/prediction_log.py); off by default."""


def app_key_sha256(settings: ServeArgs) -> str | None:
    """The hash the gateway checks X-API-Key against: `settings.api_key_sha256`, else
    `api_key_sha256(settings.api_key_file)`."""
    given = settings.api_key_sha256
    if given:
        if len(given) != 64 or any(c not in "0123456789abcdef" for c in given):
            raise ConfigError("api_key_sha256: expected 64 lowercase hex digits (a SHA-256)")
        return given
    return api_key_sha256(settings.api_key_file)


def served_models(
    registry: ModelRegistry, alias: str, names: list[str], served: dict[str, ServedKind]
) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> kind of each model to serve, name -> why not for the others): the listed
    `names`, else every model with the alias. One model whose metadata cannot be read
    never hides the others."""
    names = names or [n for n in registry.names() if alias in registry.aliases(n)]
    kinds, refused = {}, {}
    for name in names:
        try:
            kind = registry.get(name, alias).kind
        except RegistryError as exc:
            refused[name] = str(exc)
            continue
        if kind in served:
            kinds[name] = kind
        else:
            refused[name] = (
                f"kind {kind!r} is served by no family (served: {', '.join(sorted(served))})"
            )
    return kinds, refused


def check_canaries(settings: ServeArgs, kinds: dict[str, str]) -> None:
    """Each canary share names a model this application serves, and is a share; a
    shadowed model has no share."""
    for name, fraction in settings.canary_fraction.items():
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(
                f"canary_fraction.{name}: expected a share in [0, 1], got {fraction!r}"
            )
        if name not in kinds:
            raise ConfigError(
                f"canary_fraction.{name}: not a served model "
                f"(served: {', '.join(sorted(kinds)) or 'none'})"
            )
    for name in settings.shadow:
        if name not in kinds:
            raise ConfigError(
                f"shadow: {name!r} is not a served model (served: {', '.join(sorted(kinds)) or 'none'})"
            )
        if settings.canary_fraction.get(name):
            raise ConfigError(
                f"shadow: {name!r} also has a canary_fraction; its canary takes a copy of "
                f"every request or a share of them, not both"
            )
