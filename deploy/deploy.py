"""Create or update the RunPod endpoint described by deploy/endpoint.json through RunPod's REST API v2.

No official tool imports an endpoint from a file, so this one fills the file's placeholders, validates the
body against RunPod's own OpenAPI schema (vendored beside it) before anything is sent, and sends it:

    python deploy/deploy.py --owner me --volume-id abc123 --data-center EU-RO-1 [--image-tag v1] [--dry-run]
    python deploy/deploy.py ... --endpoint-id ep123          # update (PATCH) instead of create (POST)
    python deploy/deploy.py ... --type LOAD_BALANCER         # the HTTP server instead of the queue worker

Both endpoint types run the same image. endpoint.json describes the queue endpoint; `--type LOAD_BALANCER`
lays endpoint.load-balancer.json over it the way RunPod applies a template under a body (its keys replace
the base's, `env` is merged per key), so the image, GPUs, volume and secrets are written once. The ports
RunPod exposes are the ones the worker is told to listen on (env PORT and PORT_HEALTH), so they cannot
disagree.

Placeholders in string values are `${NAME}` (required) or `${NAME:-default}`. Values come from the flags, else
from environment variables of the same name (NETWORK_VOLUME_ID, DATA_CENTER_ID, GITHUB_OWNER, GITHUB_REPO,
IMAGE_TAG, …). RUNPOD_API_KEY is read from the environment only and never printed; RUNPOD_API_BASE points the
command at another server (tests use a loopback one).

Validation needs the `jsonschema` package (`pip install jsonschema`): the schema uses `unevaluatedProperties`,
`if`/`then`, `oneOf` and `dependentRequired`, which a hand-written checker would get subtly wrong, and an
unvalidated body only fails later at RunPod with less context. It runs on the operator's machine, not in the
worker image, so it is not an image requirement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ENDPOINT_FILE = HERE / "endpoint.json"
# RunPod's endpoint types, and what each lays over endpoint.json (nothing for the queue endpoint).
VARIANTS: dict[str, Path | None] = {"QUEUE": None, "LOAD_BALANCER": HERE / "endpoint.load-balancer.json"}
SPEC_FILE = HERE / "runpod-rest-v2.openapi.json"
DEFAULT_API_BASE = "https://api.runpod.io"  # the spec's `servers`
RUN_URL = "https://api.runpod.ai/v2/{id}/run"
BASE_URL = "https://{id}.api.runpod.ai"  # a load-balancer endpoint's paths are the worker's own
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(?::-([^}]*))?\}")
SECRET_REFERENCE = re.compile(r"^\{\{\s*RUNPOD_SECRET_\w+\s*\}\}$")
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PRIVATE)(_|$)|(API|ACCESS)_KEY")
# Flags and the placeholders they fill; each also reads the environment variable of the same name.
FLAGS = {
    "--volume-id": "NETWORK_VOLUME_ID",
    "--data-center": "DATA_CENTER_ID",
    "--owner": "GITHUB_OWNER",
    "--repo": "GITHUB_REPO",
    "--image-tag": "IMAGE_TAG",
}
LOWERCASE = {"GITHUB_OWNER", "GITHUB_REPO"}  # GHCR image names are lowercase


class DeployError(Exception):
    """Something the operator must fix; the message says what."""


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    body: dict[str, Any]


def fill_placeholders(document: Any, values: Mapping[str, str]) -> Any:
    """Replace placeholders inside string values (never in the raw text, so a value cannot break the JSON)."""
    missing: set[str] = set()

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(value) for value in node]
        if isinstance(node, str):
            return PLACEHOLDER.sub(lambda m: substitute(m, values, missing), node)
        return node

    filled = fill(document)
    if missing:
        hints = ", ".join(f"{name} ({flag_for(name)})" for name in sorted(missing))
        raise DeployError(f"unfilled placeholders in {ENDPOINT_FILE.name}: {hints}")
    return filled


def substitute(match: re.Match[str], values: Mapping[str, str], missing: set[str]) -> str:
    name, default = match.group(1), match.group(2)
    value = values.get(name) or default
    if not value:
        missing.add(name)
        return match.group(0)
    return value.lower() if name in LOWERCASE else value


def flag_for(name: str) -> str:
    flag = next((flag for flag, placeholder in FLAGS.items() if placeholder == name), None)
    return f"{flag} or ${name}" if flag else f"${name}"


def with_variant(endpoint: Mapping[str, Any], overlay: Mapping[str, Any] | None) -> dict[str, Any]:
    """The endpoint with the overlay's keys replacing its own, except `env`, merged per key (overlay wins)."""
    merged = dict(endpoint)
    for key, value in (overlay or {}).items():
        merged[key] = {**merged.get(key, {}), **value} if key == "env" else value
    if merged.get("type") == "LOAD_BALANCER":
        merged["ports"] = exposed_ports(merged.get("env", {}))
    return merged


def exposed_ports(env: Mapping[str, str]) -> list[str]:
    """The HTTP ports a load-balancer worker listens on. Both variables are required: RunPod's health port
    defaults to 80 whatever PORT says, the worker's to PORT, so leaving one out would split them."""
    missing = [name for name in ("PORT", "PORT_HEALTH") if not env.get(name)]
    if missing:
        raise DeployError(
            f"a LOAD_BALANCER endpoint must set env {' and '.join(missing)} (the worker's ports)"
        )
    return [f"{port}/http" for port in dict.fromkeys((env["PORT"], env["PORT_HEALTH"]))]


def check_no_literal_secrets(body: Mapping[str, Any]) -> None:
    """Secrets belong in RunPod's secret store; the endpoint may only reference them."""
    for name, value in body.get("env", {}).items():
        if SECRET_NAME.search(name) and value and not SECRET_REFERENCE.match(value):
            raise DeployError(
                f"env {name} holds a literal value; store it as a RunPod secret and reference it as "
                f'"{{{{ RUNPOD_SECRET_{name.lower()} }}}}"'
            )


def validate(body: Mapping[str, Any], schema_name: str, spec: Mapping[str, Any]) -> None:
    try:
        import jsonschema
        from referencing import Registry
        from referencing.jsonschema import DRAFT202012
    except ImportError:
        raise DeployError("validation needs the jsonschema package: pip install jsonschema") from None
    registry = Registry().with_resource("urn:runpod-v2", DRAFT202012.create_resource(spec))
    schema = {"$ref": f"urn:runpod-v2#/components/schemas/{schema_name}"}
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = sorted(validator.iter_errors(body), key=lambda error: list(error.absolute_path))
    if errors:
        lines = [f"  {'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}" for e in errors]
        raise DeployError(f"{ENDPOINT_FILE.name} does not match RunPod's {schema_name}:\n" + "\n".join(lines))


def build_request(
    endpoint: Mapping[str, Any], spec: Mapping[str, Any], api_base: str, endpoint_id: str | None
) -> Request:
    """Create is POST /v2/serverless; update is PATCH /v2/serverless/{id}, whose body cannot carry `type`."""
    check_no_literal_secrets(endpoint)
    if endpoint_id:
        body = {key: value for key, value in endpoint.items() if key != "type"}
        validate(body, "UpdateEndpointRequest", spec)
        return Request("PATCH", f"{api_base}/v2/serverless/{endpoint_id}", body)
    body = dict(endpoint)
    validate(body, "CreateEndpointRequest", spec)
    return Request("POST", f"{api_base}/v2/serverless", body)


def send(request: Request, api_key: str) -> dict[str, Any]:
    http = urllib.request.Request(
        request.url,
        data=json.dumps(request.body).encode(),
        method=request.method,
        headers={
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(http, timeout=60) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        raise DeployError(describe_api_error(error.code, error.read())) from None
    except urllib.error.URLError as error:
        raise DeployError(f"could not reach {request.url}: {error.reason}") from None


def describe_api_error(status: int, payload: bytes) -> str:
    """RunPod answers errors as problem+json: title, detail and, for a 422, one line per violation."""
    try:
        problem = json.loads(payload)
        message = f"RunPod API error {status} {problem['title']}: {problem['detail']}"
    except (ValueError, KeyError, TypeError):
        return f"RunPod API error {status}: {payload.decode(errors='replace')[:500]}"
    return "\n".join([message, *(f"  {item}" for item in problem.get("errors") or [])])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, name in FLAGS.items():
        parser.add_argument(flag, dest=name, help=f"fills ${{{name}}} (default: ${name})")
    parser.add_argument(
        "--endpoint-id", help="update this endpoint instead of creating one ($RUNPOD_ENDPOINT_ID)"
    )
    parser.add_argument("--file", type=Path, default=ENDPOINT_FILE, help="the endpoint description")
    parser.add_argument(
        "--type",
        choices=list(VARIANTS),
        default="QUEUE",
        help="QUEUE: the runpod worker behind RunPod's queue; LOAD_BALANCER: the worker's own HTTP server",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the request instead of sending it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        values = {name: getattr(args, name) or env.get(name, "") for name in FLAGS.values()}
        values |= {name: value for name, value in env.items() if name not in values}
        overlay_file = VARIANTS[args.type]
        overlay = json.loads(overlay_file.read_text()) if overlay_file else None
        endpoint = fill_placeholders(with_variant(json.loads(args.file.read_text()), overlay), values)
        spec = json.loads(SPEC_FILE.read_text())
        api_base = env.get("RUNPOD_API_BASE", DEFAULT_API_BASE).rstrip("/")
        endpoint_id = args.endpoint_id or env.get("RUNPOD_ENDPOINT_ID") or None
        request = build_request(endpoint, spec, api_base, endpoint_id)
        if args.dry_run:
            print(f"{request.method} {request.url}")
            print(json.dumps(request.body, indent=2))
            return 0
        api_key = env.get("RUNPOD_API_KEY", "").strip()
        if not api_key:
            raise DeployError(
                "RUNPOD_API_KEY is not set: create an API key in the RunPod console and export it"
            )
        result = send(request, api_key)
    except DeployError as error:
        print(f"deploy: {error}", file=sys.stderr)
        return 1
    print(f"endpoint {'updated' if endpoint_id else 'created'}: {result['id']}")
    urls = result.get("requestUrls") or {}
    if args.type == "LOAD_BALANCER":
        print(f"base URL: {urls.get('base') or BASE_URL.format(id=result['id'])}")
    else:
        print(f"run URL: {urls.get('run') or RUN_URL.format(id=result['id'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
