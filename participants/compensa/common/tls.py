"""TLS for Compensa's gRPC servers and channels, from PEM files.

One shape for both ends: a side's own certificate and key, and the CA that
signs the other side's. A server given a CA requires client certificates
signed by it (mutual TLS); a channel given a certificate and key presents
them. Participants and the orchestrator both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import overload

import grpc


class TlsConfigError(ValueError):
    """A TLS setting that cannot work: says which file or option to fix."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: `cert` and `key` are this side's, `ca` signs the other side's."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsConfigError("a TLS certificate needs its private key and the other way round: give both")

    @cached_property
    def server_credentials(self) -> grpc.ServerCredentials:
        """For serving: this side's certificate; with a CA, clients must
        present a certificate it signed. The files are read once."""
        if self.cert is None or self.key is None:
            raise TlsConfigError("serving TLS needs a certificate and its private key")
        ca = _read(self.ca)
        return grpc.ssl_server_credentials(
            [(_read(self.key), _read(self.cert))], root_certificates=ca, require_client_auth=ca is not None
        )

    @cached_property
    def channel_credentials(self) -> grpc.ChannelCredentials:
        """For calling: trusts `ca` (the system's roots when None) and
        presents this side's certificate when there is one. The files are
        read once."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca), private_key=_read(self.key), certificate_chain=_read(self.cert)
        )


@overload
def _read(path: Path) -> bytes: ...
@overload
def _read(path: None) -> None: ...
def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TlsConfigError(f"cannot read TLS file {path}: {error.strerror}") from error
    # Checked here: gRPC's C core would only log its parse failure, later, on stderr.
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"TLS file {path} is not PEM (no '-----BEGIN ' line): give a PEM certificate or key")
    return data
