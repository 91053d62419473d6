"""The names a verified client certificate carries, read one way for every
face (the gRPC API and the dashboard).

Only the subject's common name and the DNS names among its subject
alternative names can name a caller or earn a role: every CA issues them, and
their syntax leaves no room for a second reading. URI, e-mail, IP and other
alternative names, and the subject's other attributes, are kept only so that
the access policy can refuse a certificate that carries a granted name there.
A certificate whose names are ambiguous by themselves is refused here, in one
line: more than one common name, or any name with a control or other
non-printing character (a NUL byte cuts a name short in C code).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from compensa.orchestrator.shared.errors import Unauthenticated, quote

__all__ = ["CertificateNames", "read_certificate"]


@dataclass(frozen=True)
class CertificateNames:
    """What a certificate is called: `common_name` (None without one) and
    `dns_names` count; `elsewhere` holds its other names as (where, text)."""

    common_name: str | None
    dns_names: tuple[str, ...]
    elsewhere: tuple[tuple[str, str], ...]

    @property
    def counted(self) -> tuple[str, ...]:
        """The names that count, common name first, each once."""
        names = [self.common_name] if self.common_name is not None else []
        return tuple(dict.fromkeys([*names, *self.dns_names]))

    def places_of(self, name: str) -> list[str]:
        """Where `name` appears among the names that count for nothing."""
        return [where for where, text in self.elsewhere if text == name]


@functools.lru_cache(maxsize=1024)
def read_certificate(der: bytes) -> CertificateNames:
    """The names of a certificate (DER); Unauthenticated saying what is
    ambiguous or unreadable. Cached: a client presents the same certificate
    on every call."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        subject = list(certificate.subject)
        try:
            alternatives = list(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            alternatives = []
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise Unauthenticated(f"the client certificate's names cannot be read: {reason}") from None
    common_names = [str(attribute.value) for attribute in subject if attribute.oid == NameOID.COMMON_NAME]
    dns_names = [name.value for name in alternatives if isinstance(name, x509.DNSName)]
    elsewhere = [
        (attribute.rfc4514_attribute_name, attribute.value) for attribute in subject
        if attribute.oid != NameOID.COMMON_NAME and isinstance(attribute.value, str)
    ] + [_elsewhere(name) for name in alternatives if not isinstance(name, (x509.DNSName, x509.OtherName))]
    for text in [*common_names, *dns_names, *(text for _, text in elsewhere)]:
        if not all(character.isprintable() for character in text):
            raise Unauthenticated(
                f"the client certificate's name {quote(text)} holds a control or other non-printing character:"
                " ask its CA for names of printable characters only"
            )
    if len(common_names) > 1:
        raise Unauthenticated(
            f"the client certificate has {len(common_names)} common names"
            f" ({', '.join(quote(name) for name in common_names)}): ask its CA for one"
        )
    return CertificateNames(common_names[0] if common_names else None, tuple(dns_names), tuple(elsewhere))


def _elsewhere(name: x509.GeneralName) -> tuple[str, str]:
    if isinstance(name, x509.RFC822Name):
        return "e-mail name", name.value
    if isinstance(name, x509.UniformResourceIdentifier):
        return "URI", name.value
    if isinstance(name, x509.IPAddress):
        return "IP address", str(name.value)
    if isinstance(name, x509.DirectoryName):
        return "directory name", name.value.rfc4514_string()
    if isinstance(name, x509.RegisteredID):
        return "registered ID", name.value.dotted_string
    return type(name).__name__, str(name.value)
