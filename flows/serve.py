"""Serve the deployments of prefect.yaml from this machine (`make serve`): no work pool, no clone.

The schedules, parameters, tags and concurrency limits come from prefect.yaml, so the local
path and the GPU cluster run the same deployments; flow runs execute in this checkout.
Needs a Prefect server: PREFECT_API_URL (see docs/prefect.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.schedules import Cron, Interval, RRule

REPO = Path(__file__).resolve().parent.parent


def deployment_specs(prefect_yaml: Path = REPO / "prefect.yaml") -> list[dict[str, Any]]:
    """The `deployments` entries of prefect.yaml (YAML anchors and merges resolved)."""
    return (yaml.safe_load(prefect_yaml.read_text()) or {}).get("deployments") or []


def schedule_of(spec: dict[str, Any]):
    common = {"timezone": spec.get("timezone"), "active": spec.get("active", True),
              "parameters": spec.get("parameters") or {}}
    if "cron" in spec:
        return Cron(spec["cron"], day_or=spec.get("day_or", True), **common)
    if "interval" in spec:
        return Interval(spec["interval"], **common)
    if "rrule" in spec:
        return RRule(spec["rrule"], **common)
    raise ValueError(f"prefect.yaml: schedule {spec} has none of cron, interval, rrule")


def runner_deployments(specs: list[dict[str, Any]], workspace: Path = REPO):
    """RunnerDeployments for `prefect.serve`, one per prefect.yaml deployment."""
    from flows.training import training_pipeline

    out = []
    for spec in specs:
        limit = spec.get("concurrency_limit")
        if isinstance(limit, dict):
            limit = ConcurrencyLimitConfig(**limit)
        out.append(training_pipeline.to_deployment(
            name=spec["name"], description=spec.get("description"), tags=spec.get("tags"),
            schedules=[schedule_of(s) for s in spec.get("schedules") or []],
            parameters={**(spec.get("parameters") or {}), "workspace": str(workspace)},
            concurrency_limit=limit))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="deployment names to serve (default: all)")
    args = parser.parse_args()
    specs = [s for s in deployment_specs() if not args.only or s["name"] in args.only]
    if not specs:
        raise SystemExit(f"no deployment named {args.only} in {REPO / 'prefect.yaml'}")
    from prefect import serve

    serve(*runner_deployments(specs))


if __name__ == "__main__":
    main()
