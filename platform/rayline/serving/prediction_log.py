"""The sampled prediction log: a share of the model routes' requests and answers, kept as
Parquet files partitioned by model, version and date (hive-style folders:
`model=NAME/version=V/date=YYYY-MM-DD/`), local or on an object store.

Rows are taken on the request path (a dict appended to a list) and written off it: a
background task of each replica writes what it holds every `flush_s` seconds, one file
per partition, atomically. Nothing about the caller is kept: no header (the API key
travels in one), no client address; the request body, the answer body, the route
template, status, latency and the version that answered. A store that cannot be written
(a full disk, an unreachable bucket) loses log rows, counted, never a request; so does a
replica holding `max_rows` rows or `max_bytes` of bodies unwritten.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
import uuid
from datetime import datetime, timezone

from rayline.config import bounded

logger = logging.getLogger("ray.serve")


@dataclasses.dataclass
class PredictionLogArgs:
    """ServeArgs.prediction_log: off unless `uri` is set and `sample` > 0."""

    uri: str = ""
    """Where the Parquet files go: a local path, file://, s3:// or gs://."""
    sample: float = bounded(0.0, ge=0.0, le=1.0)
    """Share of the model routes' requests logged (drawn per request)."""
    flush_s: float = bounded(10.0, gt=0.0)
    """Seconds between writes."""
    max_rows: int = bounded(10_000, ge=1)
    """Rows a replica holds between writes; past it, rows are dropped (counted)."""
    max_bytes: int = bounded(64 << 20, ge=1)
    """Bytes of requests and answers a replica holds between writes; past it, rows are
    dropped (counted): 10,000 rows of 1 MiB bodies would be 20 GB."""


def schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("time", pa.timestamp("ms", tz="UTC")),
            ("role", pa.string()),
            ("route", pa.string()),
            ("method", pa.string()),
            ("status", pa.int32()),
            ("latency_ms", pa.float64()),
            ("request", pa.large_string()),
            ("response", pa.large_string()),
        ]
    )


class PredictionLog:
    """One replica's log: `sampled()` per request, `add(...)` for each sampled answer,
    `run()` as a background task."""

    def __init__(self, args: PredictionLogArgs):
        from rayline.fs import filesystem

        self.args = args
        self.fs, self.root = filesystem(args.uri)
        self.rows: list[dict] = []
        self.held_bytes = 0
        self.written = 0
        self.dropped = 0
        self.last_error = ""
        self.counter = None

    def sampled(self) -> bool:
        return random.random() < self.args.sample

    def add(
        self,
        model: str,
        version: int,
        role: str,
        scope: dict,
        status: int,
        latency_s: float,
        request: bytes,
        response: bytes,
    ) -> None:
        size = len(request) + len(response)
        if len(self.rows) >= self.args.max_rows or self.held_bytes + size > self.args.max_bytes:
            self._count("dropped", 1, model, version)
            return
        self.held_bytes += size
        self.rows.append(
            {
                "time": time.time(),
                "model": model,
                "version": version,
                "role": role,
                "route": getattr(scope.get("route"), "path", "unmatched"),
                "method": scope.get("method", ""),
                "status": status,
                "latency_ms": latency_s * 1000,
                "request": request.decode("utf-8", errors="replace"),
                "response": response.decode("utf-8", errors="replace"),
            }
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.args.flush_s)
            await asyncio.to_thread(self.flush)

    def flush(self) -> None:
        """Write what is held: one Parquet file per (model, version, date)."""
        rows, self.rows, self.held_bytes = self.rows, [], 0
        groups: dict[tuple[str, int, str], list[dict]] = {}
        for row in rows:
            day = datetime.fromtimestamp(row["time"], timezone.utc).strftime("%Y-%m-%d")
            groups.setdefault((row["model"], row["version"], day), []).append(row)
        for (model, version, day), members in groups.items():
            try:
                self._write(model, version, day, members)
                self._count("written", len(members), model, version)
            except Exception as exc:  # the log never takes a request or the replica down
                self._count("dropped", len(members), model, version)
                if str(exc) != self.last_error:
                    logger.warning("rayline: prediction log rows dropped: %s", exc)
                self.last_error = str(exc)

    def _write(self, model: str, version: int, day: str, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from rayline.fs import atomic_write

        columns = {name: [row[name] for row in rows] for name in schema().names}
        columns["time"] = [datetime.fromtimestamp(t, timezone.utc) for t in columns["time"]]
        table = pa.table(columns, schema=schema())
        folder = f"{self.root}/model={model}/version={version}/date={day}"
        self.fs.create_dir(folder, recursive=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write(self.fs, f"{folder}/{name}", lambda out: pq.write_table(table, out))

    def _count(self, state: str, rows: int, model: str, version: int) -> None:
        if state == "written":
            self.written += rows
        else:
            self.dropped += rows
        if self.counter is None:
            from ray.util import metrics

            self.counter = metrics.Counter(
                "rayline_prediction_log_rows",
                description="prediction log rows written, or dropped (store unwritable, or full)",
                tag_keys=("state", "model", "version"),
            )
        self.counter.inc(rows, {"state": state, "model": model, "version": str(version)})

    def status(self) -> dict:
        return {"written": self.written, "dropped": self.dropped, "held": len(self.rows)}
