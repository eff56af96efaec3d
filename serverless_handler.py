"""The worker's entry point, what RunPod (and the RunPod Hub) runs: the composition root.

It reads the settings, builds the one job pipeline, and starts the door that ``ENDPOINT_TYPE`` names: RunPod's
queue (:mod:`queue_api`, the default) or HTTP for load-balancer endpoints (:mod:`http_api`). The doors only
translate their protocol into pipeline calls; neither knows the other. ``bootstrap.sh`` always starts this
file, whichever the endpoint type.
"""

from __future__ import annotations

from higgs_worker.pipeline import Pipeline
from higgs_worker.redaction import install_log_redaction
from higgs_worker.settings import load_settings


def main() -> None:
    install_log_redaction()
    settings = load_settings()  # reads and checks every setting: a bad one stops the start here
    pipeline = Pipeline(settings)
    if settings.endpoint_type == "LOAD_BALANCER":
        from http_api.server import serve
    else:
        from queue_api.worker import serve
    serve(pipeline)


if __name__ == "__main__":
    main()
