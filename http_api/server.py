"""Serving the HTTP door with uvicorn: the API on PORT, the health route on PORT_HEALTH (the same by default).

The models are prepared on a background thread from the start, so the health route can answer 204 at once
and 200 when generation is possible, which is how RunPod's load balancer measures a cold start.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from starlette.types import ASGIApp

from higgs_worker.pipeline import Pipeline
from http_api.app import create_app, health_app
from http_api.limits import BodyLimit

logger = logging.getLogger("http_api")


def _config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    # One process: the models live in it. uvicorn's own logging config is kept (access log off: request
    # bodies and paths of users' voices stay out of the log).
    return uvicorn.Config(app, host=host, port=port, access_log=False, log_level="info", lifespan="off")


async def _serve_all(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    separate_health = settings.port_health != settings.port
    app = BodyLimit(create_app(pipeline, with_health=not separate_health), settings.max_request_bytes)
    servers = [uvicorn.Server(_config(app, settings.http_host, settings.port))]
    if separate_health:
        servers.append(
            uvicorn.Server(_config(health_app(pipeline), settings.http_host, settings.port_health))
        )
    await asyncio.gather(*(server.serve() for server in servers))


def serve(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    logger.info(
        "HTTP mode (ENDPOINT_TYPE=LOAD_BALANCER): API on %s:%d, health %s on port %d",
        settings.http_host,
        settings.port,
        settings.health_path,
        settings.port_health,
    )
    pipeline.runtime.prepare_in_background()
    asyncio.run(_serve_all(pipeline))
