#!/usr/bin/env python3
"""A small command-line client for Sluice's gRPC API (`sluice.v1.Telemetry`).

It shows how to call the API from Python with grpcio:

    query      raw points of one device and metric, page by page
    aggregate  bucketed AVG/MIN/MAX/COUNT of one device and metric
    latest     the last stored value of each metric of a device
    subscribe  live points of a device, as they are stored

Examples (run `pip install -r requirements.txt` first):

    python3 sluice_example.py --device pump-1 --metric temp --minutes 60 query
    python3 sluice_example.py --device pump-1 --metric temp aggregate --bucket-seconds 300
    python3 sluice_example.py --device pump-1 latest
    python3 sluice_example.py --device pump-1 subscribe --count 5

The Python stubs are generated from the `.proto` files of this repository
(`proto/sluice/v1/`) the first time the script runs, into `_generated/` next
to it. Delete that directory to regenerate them.
"""

import argparse
import datetime
import importlib.resources
import os
import shutil
import sys
import tempfile
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
# The repository's proto directory; set SLUICE_PROTO_DIR when the script
# lives somewhere else.
PROTO_DIR = Path(os.environ.get("SLUICE_PROTO_DIR", HERE.parent.parent / "proto"))
PROTO_FILES = ["sluice/v1/telemetry.proto", "sluice/v1/admin.proto"]
GENERATED_DIR = HERE / "_generated"


# --------------------------------------------------------------------------
# Stubs: generated from the .proto files on first use
# --------------------------------------------------------------------------


def ensure_stubs():
    """Generates the Python modules for the protos into GENERATED_DIR when
    they are missing or older than the protos, and makes them importable."""
    outputs = [GENERATED_DIR / f.replace(".proto", "_pb2.py") for f in PROTO_FILES]
    newest_proto = max((PROTO_DIR / f).stat().st_mtime for f in PROTO_FILES)
    if not all(o.exists() and o.stat().st_mtime >= newest_proto for o in outputs):
        generate_stubs()
    sys.path.insert(0, str(GENERATED_DIR))


def generate_stubs():
    from grpc_tools import protoc

    # grpc_tools ships google/protobuf/*.proto (Timestamp, Duration, ...).
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    # Generate into a fresh directory, then move it into place, so that a
    # second copy of the script running at the same time never sees half
    # the files.
    tmp = Path(tempfile.mkdtemp(prefix="_generating-", dir=HERE))
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--proto_path={well_known}",
        f"--python_out={tmp}",
        f"--pyi_out={tmp}",  # type hints, for editors
        f"--grpc_python_out={tmp}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"error: protoc failed on {PROTO_FILES} in {PROTO_DIR}")
    shutil.rmtree(GENERATED_DIR, ignore_errors=True)
    try:
        tmp.rename(GENERATED_DIR)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another run was faster


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def connect(args):
    """A channel to the server: TLS when --tls-ca is given, else plaintext."""
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.secure_channel(args.target, credentials)
    return grpc.insecure_channel(args.target)


def call_metadata(args):
    """The API token travels as `authorization: Bearer <token>` metadata."""
    if args.token:
        return [("authorization", f"Bearer {args.token}")]
    return []


def time_range(minutes):
    """(start, end) Timestamps of the last `minutes` minutes. Ranges are
    half-open: start is inclusive, end is exclusive."""
    from google.protobuf.timestamp_pb2 import Timestamp

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = Timestamp(), Timestamp()
    start.FromDatetime(now - datetime.timedelta(minutes=minutes))
    end.FromDatetime(now)
    return start, end


def fmt_time(ts):
    """A Timestamp as RFC 3339 in UTC, e.g. 2025-01-31T12:00:00.250Z."""
    return ts.ToJsonString()


def require_device(args):
    if not args.device:
        sys.exit(f"error: {args.command} needs --device")


# --------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------


def cmd_query(stub, pb, args):
    """QueryPoints, following next_page_token until the last page."""
    require_device(args)
    start, end = time_range(args.minutes)
    request = pb.QueryPointsRequest(
        device_id=args.device,
        metric=args.metric or "",  # empty: every metric
        start=start,
        end=end,
        limit=args.page_size,  # 0: the server's default page size
    )
    total = 0
    while True:
        response = stub.QueryPoints(request, metadata=call_metadata(args))
        for point in response.points:
            print(fmt_time(point.time), point.value)
            total += 1
        if not response.next_page_token:  # empty token: that was the last page
            break
        request.page_token = response.next_page_token
    print(f"points: {total}")


# --fill: what to do with buckets that hold no point.
FILLS = {
    "none": "FILL_NONE",  # leave them out
    "null": "FILL_NULL",  # send them, without values
    "previous": "FILL_PREVIOUS",  # repeat the last bucket's values
    "linear": "FILL_LINEAR",  # interpolate between the neighbours
}


def cmd_aggregate(stub, pb, args):
    """AggregatePoints: one line per bucket with AVG, MIN, MAX and COUNT."""
    from google.protobuf.duration_pb2 import Duration

    start, end = time_range(args.minutes)
    request = pb.AggregatePointsRequest(
        device_ids=[args.device] if args.device else [],  # empty: every device
        metrics=[args.metric] if args.metric else [],  # empty: every metric
        start=start,
        end=end,
        # Fixed-width buckets, aligned to the Unix epoch.
        bucket=Duration(seconds=args.bucket_seconds),
        # Each bucket's `values` come in this order.
        aggregates=[pb.AGGREGATE_AVG, pb.AGGREGATE_MIN, pb.AGGREGATE_MAX, pb.AGGREGATE_COUNT],
        fill=pb.Fill.Value(FILLS[args.fill]),
    )
    total = 0
    while True:  # pages hold whole series; follow them as in `query`
        response = stub.AggregatePoints(request, metadata=call_metadata(args))
        for series in response.series:
            if not (args.device and args.metric):
                print(f"# {series.device_id} {series.metric}")
            for bucket in series.buckets:
                start_text = fmt_time(bucket.start)
                if not bucket.values:
                    # An empty bucket sent because of --fill null (or with
                    # nothing to fill from).
                    print(start_text, "filled")
                else:
                    avg, min_, max_, count = bucket.values
                    line = f"{start_text} {avg} {min_} {max_} {int(count)}"
                    # --fill previous/linear: values made up, COUNT is 0.
                    print(line + (" filled" if bucket.filled else ""))
                total += 1
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    print(f"buckets: {total}")


def cmd_latest(stub, pb, args):
    """LatestPoints: the newest point (by time) of each metric."""
    require_device(args)
    request = pb.LatestPointsRequest(
        device_ids=[args.device],
        metrics=[args.metric] if args.metric else [],  # empty: every metric
    )
    while True:
        response = stub.LatestPoints(request, metadata=call_metadata(args))
        for point in response.points:
            print(point.metric, fmt_time(point.time), point.value)
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token


def cmd_subscribe(stub, pb, args):
    """Subscribe: a server stream of live points, read until --count points
    arrived or --timeout seconds passed."""
    request = pb.SubscribeRequest(
        device_ids=[args.device] if args.device else [],  # empty: every device
        metrics=[args.metric] if args.metric else [],
        points=True,  # points only, no events
    )
    # The timeout is the call's deadline: the stream ends with
    # DEADLINE_EXCEEDED when it passes.
    call = stub.Subscribe(request, metadata=call_metadata(args), timeout=args.timeout)
    received = 0
    try:
        # The server sends its response headers once the subscription is in
        # place: from then on, every point stored is delivered.
        call.initial_metadata()
        if not call.done():  # (a refused call ends right away)
            print("subscribed", flush=True)
        for response in call:
            if response.gap:
                # This client read too slowly; the server skipped that many.
                print(f"gap: {response.gap}", flush=True)
            for point in response.points:
                print(point.device_id, point.metric, fmt_time(point.time), point.value, flush=True)
                received += 1
                if received >= args.count:
                    break
            if received >= args.count:
                call.cancel()  # ends the stream on the server too
                break
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    except KeyboardInterrupt:
        call.cancel()
    print(f"received: {received}", flush=True)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description="Query Sluice's telemetry over gRPC.")
    # Options of every subcommand: give them before the subcommand's name.
    parser.add_argument(
        "--target", default="localhost:50051", help="server host:port (default: %(default)s)"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SLUICE_TOKEN"),
        help="API token (default: $SLUICE_TOKEN); none for a server that allows anonymous calls",
    )
    parser.add_argument(
        "--tls-ca", metavar="FILE", help="use TLS, trusting this CA certificate (PEM)"
    )
    parser.add_argument("--device", metavar="DEVICE_ID", help="the device")
    parser.add_argument("--metric", metavar="METRIC", help="the metric (default: every metric)")
    parser.add_argument(
        "--minutes", type=float, default=60, help="the last N minutes (default: %(default)s)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    query = commands.add_parser("query", help="raw points, every page")
    query.add_argument(
        "--page-size", type=int, default=0, help="points per page (default: the server's)"
    )
    query.set_defaults(run=cmd_query)

    aggregate = commands.add_parser("aggregate", help="AVG, MIN, MAX and COUNT per time bucket")
    aggregate.add_argument(
        "--bucket-seconds", type=int, default=60, help="bucket width (default: %(default)s)"
    )
    aggregate.add_argument(
        "--fill", choices=list(FILLS), default="none", help="empty buckets (default: %(default)s)"
    )
    aggregate.set_defaults(run=cmd_aggregate)

    latest = commands.add_parser("latest", help="the last value of each metric")
    latest.set_defaults(run=cmd_latest)

    subscribe = commands.add_parser("subscribe", help="live points as they are stored")
    subscribe.add_argument(
        "--count", type=int, default=10, help="stop after N points (default: %(default)s)"
    )
    subscribe.add_argument(
        "--timeout", type=float, help="stop after this many seconds (default: never)"
    )
    subscribe.set_defaults(run=cmd_subscribe)
    return parser.parse_args()


def main():
    args = parse_args()
    ensure_stubs()
    from sluice.v1 import telemetry_pb2, telemetry_pb2_grpc

    with connect(args) as channel:
        stub = telemetry_pb2_grpc.TelemetryStub(channel)
        try:
            args.run(stub, telemetry_pb2, args)
        except grpc.RpcError as e:
            # e.g. UNAUTHENTICATED (no or a bad token), INVALID_ARGUMENT
            # (names the bad field), UNAVAILABLE (server not reachable).
            sys.exit(f"error: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
