"""The client commands' gRPC channel to the orchestrator, from the global
options --address and --tls-ca / --tls-cert / --tls-key."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from compensa.common.tls import TlsFiles

#: A watch reconnects within a couple of seconds of its orchestrator coming
#: back, instead of after gRPC's default backoff (1s growing to 2 minutes).
RECONNECT_QUICKLY = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000))


def open_channel(args: argparse.Namespace, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to --address: over TLS if any --tls-* file is given, in plaintext otherwise."""
    tls = tls_files(args.client_tls_ca, args.client_tls_cert, args.client_tls_key)
    if tls is None:
        return grpc.insecure_channel(args.address, options=options)
    return grpc.secure_channel(args.address, tls.channel_credentials, options=options)


def tls_files(ca: Path | None, cert: Path | None, key: Path | None) -> TlsFiles | None:
    """Client-side TLS, or None (plaintext) when no file is given."""
    return TlsFiles(cert=cert, key=key, ca=ca) if (ca or cert or key) else None
