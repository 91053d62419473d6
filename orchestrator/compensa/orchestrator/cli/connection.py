"""The client commands' gRPC channel to the orchestrator, from the global
options --address and --tls-ca / --tls-cert / --tls-key."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compensa.common.tls import TlsFiles

#: A watch reconnects within a couple of seconds of its orchestrator coming
#: back, instead of after gRPC's default backoff (1s growing to 2 minutes).
RECONNECT_QUICKLY = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000))
#: How long a client command waits for an orchestrator that is still starting
#: (`compensa serve ... &` on the line before) before its first call, which
#: then says why nothing answers.
SERVER_START_WAIT_SECONDS = 5.0
#: What gRPC's details say when nothing listens at the address (or the host is not there).
_NOTHING_THERE = re.compile(
    r"connection refused|dns resolution failed|no route to host|network is unreachable|name or service not known",
    re.IGNORECASE,
)


def open_channel(args: argparse.Namespace, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to --address: over TLS if any --tls-* file is given, in
    plaintext otherwise. Waits up to SERVER_START_WAIT_SECONDS (or --timeout,
    if shorter) for the orchestrator to answer: one that is starting is
    waited for; one that is not there fails the first call."""
    tls = tls_files(args.client_tls_ca, args.client_tls_cert, args.client_tls_key)
    options = (*dict((*RECONNECT_QUICKLY, *options)).items(),)
    if tls is None:
        channel = grpc.insecure_channel(args.address, options=options)
    else:
        channel = grpc.secure_channel(args.address, tls.channel_credentials, options=options)
    _wait_until_serving(channel, time.monotonic() + min(args.timeout, SERVER_START_WAIT_SECONDS))
    return channel


def _wait_until_serving(channel: grpc.Channel, deadline: float) -> None:
    """Returns once the orchestrator's health says SERVING (it listens before
    its database is ready), or at `deadline`, whichever comes first."""
    ready = grpc.channel_ready_future(channel)
    try:
        ready.result(timeout=max(deadline - time.monotonic(), 0.0))
    except grpc.FutureTimeoutError:
        ready.cancel()  # nothing answers: the first call says so
        return
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), timeout=max(deadline - time.monotonic(), 0.0)
    )
    try:
        for answer in watch:
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
    except grpc.RpcError:
        return  # no health service, or still not serving: the first call says what it says
    finally:
        watch.cancel()


def no_orchestrator_text(error: grpc.Call, address: str) -> str | None:
    """What to tell the user when `error` says nothing listens at `address`; None for any other error."""
    reason = _NOTHING_THERE.search(error.details() or "") if error.code() == grpc.StatusCode.UNAVAILABLE else None
    if reason is None:
        return None
    return (
        f"no orchestrator at {address} ({reason.group(0).lower()}); start one with `compensa serve`, or point at"
        " one with --address HOST:PORT or $COMPENSA_ADDRESS"
    )


def tls_files(ca: Path | None, cert: Path | None, key: Path | None) -> TlsFiles | None:
    """Client-side TLS, or None (plaintext) when no file is given."""
    return TlsFiles(cert=cert, key=key, ca=ca) if (ca or cert or key) else None
