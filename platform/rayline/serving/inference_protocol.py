"""The Open Inference Protocol (KServe's "V2" REST protocol, which Triton and MLServer
speak) beside rayline's own routes, for every kind a family declares tensors for
(`ServedKind.protocol`): the clients an inference platform already runs
(`tritonclient.http`, KServe's `InferenceRESTClient`) work against `rayline serve`.

    GET  /v2                                         server metadata
    GET  /v2/health/live, /v2/health/ready           200 when true, 400 when not
    GET  /v2/models/{name}[/versions/{v}]            inputs and outputs: name, datatype, shape
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

`{v}` is a version the app serves now (the serving one or the canary); without it, a
request goes where the model's own route would send it (the canary split included) and
the answer names the version. The routes run inside the same guard as every other (API
key, body limit, metrics per version, prediction log) and call the same predictors (drift,
shadow, batching, worker lanes). A request is counted before anything is computed: its
tensors' element counts against their shapes and the kind's limits, every number
checked for its datatype (a float32 within float32's range, an integer within its type's).

Errors are the protocol's: `{"error": "..."}`, 400 for input that cannot be used, 404 for
an unknown model or version (and rayline's 401, 413, 503 and 504 with the same body).
Triton's binary tensor extension (tritonclient's default) is spoken both ways: raw
little-endian tensors after the JSON, counted against their shapes, floats checked
finite as JSON's are.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
import dataclasses
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from rayline.serving.base import BadInput
from rayline.serving.http import Models, ModelsDep

BINARY_HEADER = "inference-header-content-length"
MAX_ELEMENTS = 1 << 22
"""Elements in one request's tensors together (4 M): a kind's own limits are lower."""

DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
"""The protocol's datatypes and the numpy type each becomes."""

FLOAT_LIMITS = {t: float(np.finfo(DATATYPES[t]).max) for t in ("FP16", "FP32", "FP64")}
DATATYPE_OF = {np.dtype(t): name for name, t in DATATYPES.items() if name != "BYTES"}
"""An output array's dtype -> the protocol's datatype (anything else is BYTES)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output as the protocol's metadata describes it; -1: any length."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    parameters: dict | None = None
    """What a client needs to fill the tensor beyond its shape (an XGBoost model's
    feature names, in the order of the last axis, and each categorical feature's
    categories, by index): the metadata's optional `parameters`, as MLServer's tensor
    metadata carries them."""

    def metadata(self) -> dict:
        described = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        if self.parameters:
            described["parameters"] = self.parameters
        return described


@dataclasses.dataclass(frozen=True)
class KindProtocol:
    """How a kind speaks the protocol: the tensors a served model takes and gives (asked
    of its predictor, wherever it is held, as `models.call(name, kind, "tensors")`), and
    an answer to an infer request's checked inputs."""

    platform: str
    """The metadata's `platform`, e.g. "rayline_dqn"."""
    inputs: dict[str, tuple[str, ...]]
    """Each input's name -> the datatypes it may have (a DQN's observations: FP32, or
    UINT8 for image stacks): another name or datatype is refused before anything is
    computed."""
    infer: Callable[
        [Models, str, dict[str, np.ndarray], dict, int | None], Awaitable[tuple[int, dict]]
    ]
    """(models, model name, inputs by name, parameters, the version the route named or
    None) -> (version, outputs by name as numpy arrays); BadInput for inputs the model
    cannot use."""


def protocol_error(status: int, message: str, headers: dict | None = None) -> Response:
    return Response(
        json.dumps({"error": message}).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def parse_inputs(body: bytes, headers) -> tuple[dict, dict[str, np.ndarray]]:
    """The request's JSON and its inputs as arrays, every element counted and checked
    before any is converted (BadInput names what is wrong). With Triton's binary tensor
    extension (the header Inference-Header-Content-Length: the JSON's length), the raw
    tensors follow the JSON, in the order of the inputs that declare binary_data_size."""
    binary = b""
    if BINARY_HEADER in headers:
        length = headers[BINARY_HEADER]
        if not length.isdigit() or not 0 < int(length) <= len(body):
            raise BadInput(
                f"Inference-Header-Content-Length: {length[:20]!r} is not the length of the "
                f"JSON part of a {len(body)}-byte body"
            )
        body, binary = body[: int(length)], memoryview(body)[int(length) :]
    try:
        request = STRICT_JSON.decode(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"the body is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadInput("the body must be a JSON object with `inputs`")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadInput("inputs: expected a non-empty list of tensors")
    declared = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise BadInput(f"{where}: expected an object with name, shape, datatype and data")
        name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
        if not isinstance(name, str) or not name:
            raise BadInput(f"{where}.name: expected a string")
        if datatype not in DATATYPES:
            raise BadInput(f"{name}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        if (
            not isinstance(shape, list)
            or not shape
            or not all(type(n) is int and n >= 0 for n in shape)
        ):
            raise BadInput(f"{name}: shape must be a list of non-negative whole numbers")
        declared += math.prod(shape)
        if declared > MAX_ELEMENTS:
            raise BadInput(f"inputs: over {MAX_ELEMENTS:,} elements in one request")
    arrays, offset = {}, 0
    for tensor in inputs:
        name, shape, datatype = tensor["name"], tensor["shape"], tensor["datatype"]
        if name in arrays:
            raise BadInput(f"{name}: given twice")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[name] = tensor_array(name, tensor.get("data"), shape, datatype)
            continue
        if type(size) is not int or size < 0 or offset + size > len(binary):
            raise BadInput(
                f"{name}: binary_data_size {size!r} is more than the {len(binary) - offset} "
                "bytes left after the JSON"
            )
        arrays[name] = binary_array(name, binary[offset : offset + size], shape, datatype)
        offset += size
    if offset != len(binary):
        raise BadInput(
            f"the body has {len(binary) - offset} bytes no input's binary_data_size claims"
        )
    return request, arrays


def binary_array(name: str, raw: memoryview, shape: list[int], datatype: str) -> np.ndarray:
    """A tensor's raw little-endian bytes (Triton's binary extension) as an array, its
    size checked against its shape and its numbers as JSON's are (finite floats only:
    binary can carry NaN and infinities, JSON cannot)."""
    count = math.prod(shape)
    if datatype == "BYTES":  # each element: a 4-byte little-endian length, then the bytes
        elements, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise BadInput(f"{name}: a BYTES element's length is cut short")
            length = int.from_bytes(raw[at : at + 4], "little")
            if at + 4 + length > len(raw):
                raise BadInput(f"{name}: a BYTES element runs past its tensor's bytes")
            try:
                elements.append(bytes(raw[at + 4 : at + 4 + length]).decode())
            except UnicodeDecodeError:
                raise BadInput(
                    f"{name}: BYTES elements must be UTF-8 text (base64 for files)"
                ) from None
            at += 4 + length
            if len(elements) > count:
                break
        if len(elements) != count:
            raise BadInput(f"{name}: {len(elements)} BYTES elements, its shape says {count}")
        return np.array(elements, dtype=np.object_).reshape(shape)
    numpy_type = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(raw) != count * numpy_type.itemsize:
        raise BadInput(
            f"{name}: {len(raw)} bytes, its shape and {datatype} say {count * numpy_type.itemsize}"
        )
    array = np.frombuffer(raw, dtype=numpy_type).reshape(shape).astype(numpy_type.newbyteorder("="))
    if datatype.startswith("FP") and not np.isfinite(array).all():
        index = int(np.flatnonzero(~np.isfinite(array.ravel()))[0])
        raise BadInput(f"{name}[{index}]: {array.ravel()[index]} is not a finite {datatype} number")
    if datatype == "BOOL" and not np.isin(np.frombuffer(raw, np.uint8), (0, 1)).all():
        raise BadInput(f"{name}: BOOL bytes must be 0 or 1")
    return array


def tensor_array(name: str, data: Any, shape: list[int], datatype: str) -> np.ndarray:
    """`data` (nested or flat, row-major) as an array of `shape` and `datatype`, each
    element checked: JSON numbers of the type (no strings or booleans for numbers), within
    the datatype's range (float32's for FP32: no 1e300)."""
    expected = math.prod(shape)
    flat = _flatten(name, data, expected)
    if datatype == "BYTES":
        if not all(type(v) is str for v in flat):
            raise BadInput(f"{name}: BYTES data must be strings")
        return np.array(flat, dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        if not all(type(v) is bool for v in flat):
            raise BadInput(f"{name}: BOOL data must be true or false")
        return np.array(flat, dtype=np.bool_).reshape(shape)
    kinds = set(map(type, flat))
    numpy_type = DATATYPES[datatype]
    if datatype.startswith("FP"):
        if not kinds <= {int, float}:
            raise BadInput(f"{name}: {datatype} data must be JSON numbers")
        limit = FLOAT_LIMITS[datatype]
        # A comparison is False for NaN and both infinities: one pass finds them too.
        # Python's pass for a few numbers, numpy's for many (1 us against 2 us for 4
        # numbers; 64 us against 19 us for 1,024).
        if len(flat) <= 64:
            within = all(-limit <= value <= limit for value in flat)
            values = np.array(flat, dtype=numpy_type) if within else None
        else:
            try:
                values = np.array(flat, dtype=np.float64)
                within = bool((np.abs(values) <= limit).all())
                values = values.astype(numpy_type) if within else None
            except OverflowError:  # an integer past float64's range (10**400)
                within = False
        if not within:
            index = next(i for i, v in enumerate(flat) if not -limit <= v <= limit)
            raise BadInput(f"{name}[{index}]: {flat[index]!r} is not a finite {datatype} number")
        return values.reshape(shape)
    if not kinds <= {int}:
        raise BadInput(f"{name}: {datatype} data must be whole JSON numbers")
    info = np.iinfo(numpy_type)
    for index, value in enumerate(flat):
        if not info.min <= value <= info.max:
            raise BadInput(f"{name}[{index}]: {value} is outside {datatype}'s range")
    return np.array(flat, dtype=numpy_type).reshape(shape)


def _flatten(name: str, data: Any, expected: int) -> list:
    """Row-major elements of nested lists, stopping as soon as they outnumber `expected`."""
    if not isinstance(data, list):
        raise BadInput(f"{name}.data: expected a list")
    flat: list = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
            if len(flat) > expected:
                raise BadInput(f"{name}: data has more elements than its shape's {expected}")
        else:
            stack.pop()
    if len(flat) != expected:
        raise BadInput(f"{name}: data has {len(flat)} elements, its shape says {expected}")
    return flat


def _no_constant(text: str):
    raise ValueError(f"{text} is not a JSON number")


STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)
"""JSON without NaN or Infinity: one decoder for every request (json.loads with an
argument builds a new one each call)."""


def output_tensor(name: str, value: np.ndarray, binary: bool) -> tuple[dict, bytes]:
    """An output as the protocol writes it: flat, row-major JSON data, or (binary) its
    size in the JSON and its little-endian bytes to follow it."""
    array = np.asarray(value)
    datatype = DATATYPE_OF.get(array.dtype, "BYTES")
    tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if not binary:
        flat = array.ravel()
        tensor["data"] = [str(v) for v in flat] if datatype == "BYTES" else flat.tolist()
        return tensor, b""
    if datatype == "BYTES":
        encoded = [str(v).encode() for v in array.ravel()]
        raw = b"".join(len(e).to_bytes(4, "little") + e for e in encoded)
    else:
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    return tensor, raw


def encoded_outputs(request: dict, outputs: dict[str, np.ndarray]) -> tuple[list[dict], bytes]:
    """The outputs the request names (all when it names none; an unknown name is a 400),
    each in JSON or in binary as it asks (per output `binary_data`, else the request's
    `binary_data_output`), and the binary outputs' bytes in order."""
    default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    wanted = request.get("outputs")
    if wanted is None:
        wanted = [{"name": name} for name in outputs]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise BadInput("outputs: expected a list of objects with a name")
    tensors, raw = [], []
    for requested in wanted:
        name = requested.get("name")
        if name not in outputs:
            raise BadInput(f"outputs: {name!r} is not an output (outputs: {', '.join(outputs)})")
        parameters = requested.get("parameters") or {}
        binary = bool(parameters.get("binary_data", default_binary))
        tensor, data = output_tensor(name, outputs[name], binary)
        tensors.append(tensor)
        raw.append(data)
    return tensors, b"".join(raw)


class Speaking:
    """What the protocol's routes do for the kinds in `protocols` (kind -> KindProtocol),
    whatever router declares them."""

    def __init__(self, protocols: dict[str, KindProtocol]):
        self.protocols = protocols

    def spoken(self, models: Models, name: str, version: str | None) -> tuple[str, KindProtocol]:
        """(kind, its protocol) of a served model, the version checked; HTTPException."""
        kind = models.kind_of(name)
        if kind is None:
            known = sorted(n for n in models.names() if models.kind_of(n) in self.protocols)
            raise HTTPException(404, f"no model {name!r} (known: {', '.join(known) or 'none'})")
        if kind not in self.protocols:
            raise HTTPException(
                404, f"{name} is a {kind} model, which rayline does not serve over this protocol"
            )
        if version is not None and _version(version) not in models.served_versions(name):
            served = ", ".join(map(str, models.served_versions(name))) or "none"
            raise HTTPException(404, f"{name} has no version {version} served (served: {served})")
        return kind, self.protocols[kind]

    @staticmethod
    async def answered(work: Callable[[], Awaitable[Response]]) -> Response:
        """The route's answer, every error in the protocol's shape."""
        try:
            return await work()
        except BadInput as exc:
            return protocol_error(400, str(exc))
        except HTTPException as exc:
            message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
            return protocol_error(exc.status_code, message, exc.headers)

    async def metadata(self, models: Models, name: str, version: str | None) -> Response:
        kind, protocol = self.spoken(models, name, version)
        wanted = None if version is None else _version(version)
        _, (inputs, outputs) = await models.call(name, kind, "tensors", version=wanted)
        return _json(
            {
                "name": name,
                "versions": [str(v) for v in models.served_versions(name)],
                "platform": protocol.platform,
                "inputs": [spec.metadata() for spec in inputs],
                "outputs": [spec.metadata() for spec in outputs],
            }
        )

    async def model_ready(self, models: Models, name: str, version: str | None) -> Response:
        self.spoken(models, name, version)
        if not models.ready() or not models.served_versions(name):
            return protocol_error(400, f"{name} is not ready")
        return _json({"name": name, "ready": True})

    async def infer(
        self, models: Models, name: str, version: str | None, request: Request
    ) -> Response:
        _, protocol = self.spoken(models, name, version)
        body, inputs = parse_inputs(await request.body(), request.headers)
        for tensor in body["inputs"]:
            expected = protocol.inputs.get(tensor["name"])
            if expected is None:
                raise BadInput(
                    f"inputs: {tensor['name']!r} is not an input of {name} "
                    f"(inputs: {', '.join(protocol.inputs)})"
                )
            if tensor["datatype"] not in expected:
                raise BadInput(
                    f"{tensor['name']}: datatype {tensor['datatype']}, expected "
                    f"{' or '.join(expected)}"
                )
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadInput("parameters: expected an object")
        wanted = None if version is None else _version(version)
        answered_version, outputs = await protocol.infer(models, name, inputs, parameters, wanted)
        tensors, raw = encoded_outputs(body, outputs)
        answer = {"model_name": name, "model_version": str(answered_version), "outputs": tensors}
        if "id" in body:
            answer["id"] = body["id"]
        if not raw:
            return _json(answer)
        header = json.dumps(answer).encode()
        return Response(
            header + raw,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )


def routers(protocols: dict[str, KindProtocol], server_version: str) -> tuple[APIRouter, APIRouter]:
    """The protocol's routes for the kinds in `protocols` (kind -> KindProtocol): the
    infer routes, which the app tries right after the families' own, and the health
    and metadata routes, tried last."""
    speaking = Speaking(protocols)
    return infer_router(speaking), metadata_router(speaking, server_version)


def infer_router(speaking: Speaking) -> APIRouter:
    routes = APIRouter(tags=["open inference protocol"])

    # The replica's models from the request, not ModelsDep: FastAPI's dependency solving
    # was a tenth of the protocol's cost per request beside the native route.
    @routes.post("/v2/models/{name}/infer")
    async def infer_model(name: str, request: Request):
        models = request.app.state.models
        return await speaking.answered(lambda: speaking.infer(models, name, None, request))

    @routes.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(name: str, version: str, request: Request):
        models = request.app.state.models
        return await speaking.answered(lambda: speaking.infer(models, name, version, request))

    return routes


def metadata_router(speaking: Speaking, server_version: str) -> APIRouter:
    routes = APIRouter(tags=["open inference protocol"])

    @routes.get("/v2")
    async def server_metadata():
        return {"name": "rayline", "version": server_version, "extensions": ["binary_tensor_data"]}

    # 200 with a body saying so (KServe's servers and clients), 400 when not (Triton's).
    @routes.get("/v2/health/live")
    async def live():
        return _json({"live": True})

    @routes.get("/v2/health/ready")
    async def ready(models: ModelsDep):
        if models.ready():
            return _json({"ready": True})
        return protocol_error(400, "loading its models")

    @routes.get("/v2/models/{name}")
    async def model_metadata(name: str, models: ModelsDep):
        return await speaking.answered(lambda: speaking.metadata(models, name, None))

    @routes.get("/v2/models/{name}/versions/{version}")
    async def version_metadata(name: str, version: str, models: ModelsDep):
        return await speaking.answered(lambda: speaking.metadata(models, name, version))

    @routes.get("/v2/models/{name}/ready")
    async def ready_model(name: str, models: ModelsDep):
        return await speaking.answered(lambda: speaking.model_ready(models, name, None))

    @routes.get("/v2/models/{name}/versions/{version}/ready")
    async def ready_version(name: str, version: str, models: ModelsDep):
        return await speaking.answered(lambda: speaking.model_ready(models, name, version))

    return routes


def _version(text: str) -> int:
    if not text.isdigit():
        raise HTTPException(404, f"version {text!r}: versions are whole numbers")
    return int(text)


def _json(content: dict) -> Response:
    return Response(json.dumps(content).encode(), media_type="application/json")
