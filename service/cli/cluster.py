"""`maskclip submit | status | logs | stop | list | render`: Ray Jobs API and KubeRay commands.

    maskclip submit jobs/s3.yaml --address http://127.0.0.1:8265 [--set k=v] [--no-wait]
    maskclip status JOB_ID [--json]   maskclip logs JOB_ID --follow
    maskclip stop JOB_ID              maskclip list [--json]
    maskclip render jobs/s3.yaml --image ghcr.io/maskclip/maskclip-service@sha256:HEX > rayjob.yaml

--address defaults to $RAY_ADDRESS, then http://127.0.0.1:8265 (e.g. a `kubectl port-forward`).
Only argparse at the top: service.cluster (pydantic, yaml) and ray load inside the commands.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from datetime import datetime, timezone

from .common import spec_args

TERMINAL_OK = "SUCCEEDED"


def _address_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="Ray Jobs API URL (default: $RAY_ADDRESS, else http://127.0.0.1:8265)",
    )
    p.add_argument(
        "--allow-insecure-http",
        dest="allow_insecure",
        action="store_true",
        help="allow plain http:// to a non-loopback host (unencrypted)",
    )


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_submit(args: argparse.Namespace) -> int:
    from .. import cluster

    job_id = cluster.submit(
        args.spec,
        args.overrides,
        args.address,
        allow_insecure=args.allow_insecure,
        wait=args.wait,
        working_dir=args.working_dir,
        entrypoint=args.entrypoint,
    )
    if args.wait:
        state = cluster.job_status(job_id, args.address, allow_insecure=args.allow_insecure)
        return 0 if state == TERMINAL_OK else 1
    return 0


def job_json(info) -> dict:
    """A job's details as JSON (status and list --json): times in ISO 8601 UTC."""
    from .. import cluster

    def iso(ms):
        if not ms:
            return None
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")

    return {
        "job": info.submission_id or info.job_id,
        "run": (info.metadata or {}).get("maskclip_run"),
        "status": cluster._status(info),
        "message": info.message or None,
        "entrypoint": info.entrypoint,
        "start": iso(info.start_time),
        "end": iso(info.end_time),
    }


def cmd_status(args: argparse.Namespace) -> int:
    from .. import cluster

    out = io.StringIO() if args.json else None
    info = cluster.status(args.job_id, args.address, allow_insecure=args.allow_insecure, out=out)
    if args.json:
        print(json.dumps(job_json(info), indent=2))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from .. import cluster

    cluster.logs(args.job_id, args.address, follow=args.follow, allow_insecure=args.allow_insecure)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from .. import cluster

    state = cluster.stop(args.job_id, args.address, allow_insecure=args.allow_insecure)
    return 0 if state in cluster.TERMINAL else 1


def cmd_list(args: argparse.Namespace) -> int:
    from .. import cluster

    out = io.StringIO() if args.json else None
    jobs = cluster.list_jobs(args.address, allow_insecure=args.allow_insecure, out=out)
    if args.json:
        print(json.dumps([job_json(j) for j in jobs], indent=2))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .. import cluster
    from ..k8s import dump_manifests, render_manifests
    from ..spec import load_spec

    spec = cluster.for_cluster(load_spec(args.spec, args.overrides))
    for warning in cluster.cluster_warnings(spec):
        print(f"warning: {warning}", file=sys.stderr)
    options = {}
    if args.active_deadline is not None:
        options["active_deadline_seconds"] = args.active_deadline
    docs = render_manifests(
        spec,
        cluster.shipped_yaml(spec),
        image=args.image,
        namespace=args.namespace,
        ttl_seconds_after_finished=args.ttl,
        backoff_limit=args.backoff_limit,
        **options,
    )
    sys.stdout.write(dump_manifests(docs))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a spec to a Ray cluster (Jobs API)")
    spec_args(p)
    _address_args(p)
    p.add_argument(
        "--working-dir",
        default=None,
        metavar="DIR",
        help="also ship this repository (dev clusters; runs `python -m service.cli` from it)",
    )
    p.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="return once submitted (default: follow the logs until the job ends, as `ray job "
        "submit` does; Ctrl-C stops following, not the job)",
    )
    p.add_argument("--wait", dest="wait", action="store_true", help=argparse.SUPPRESS)  # old flag
    p.add_argument("--entrypoint", default=None, help=argparse.SUPPRESS)  # advanced / tests
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show a submitted job's status")
    p.add_argument("job_id")
    _address_args(p)
    _json_arg(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="print a submitted job's logs")
    p.add_argument("job_id")
    _address_args(p)
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("stop", help="stop a job gracefully (it checkpoints first)")
    p.add_argument("job_id")
    _address_args(p)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("list", help="list the jobs submitted to a Ray cluster")
    _address_args(p)
    _json_arg(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("render", help="print a KubeRay RayJob (+ ConfigMap) for a spec")
    spec_args(p)
    p.add_argument(
        "--image",
        default=None,
        metavar="REF",
        help="container image, REPO[:TAG] or pinned REPO[:TAG]@sha256:<64 hex> (default: the "
        "project's); anything else is refused",
    )
    p.add_argument("--namespace", default="maskclip", help="Kubernetes namespace")
    p.add_argument("--ttl", type=int, default=3600, help="ttlSecondsAfterFinished (default 3600)")
    p.add_argument(
        "--backoff-limit",
        type=int,
        default=None,
        help="RayJob retries (default: the spec's cluster.backoff_limit)",
    )
    p.add_argument(
        "--active-deadline", type=int, default=None, metavar="SECONDS", help="activeDeadlineSeconds"
    )
    p.set_defaults(func=cmd_render)
