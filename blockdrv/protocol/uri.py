"""NBD URIs (NetworkBlockDevice/nbd doc/uri.md).

``nbd://host[:port]/export``, ``nbds://...`` (TLS required), ``nbd+unix:///export?socket=PATH``
and ``nbds+unix://...``; ``nbd+tcp`` and ``nbds+tcp`` are accepted as aliases of ``nbd``
and ``nbds``.  The export name is the percent-decoded path without its leading ``/``.
Query parameters: ``socket`` (Unix schemes, required), ``tls-hostname``,
``tls-verify-peer`` (0 or 1), ``tls-type`` (only ``x509``), ``tls-certificates`` (a
directory of PEM files, as nbdkit and libnbd name it), and any ``x-`` experimental
parameter (ignored).  Anything else is an InvalidArgumentError (a ValueError) that names
the problem.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .constants import MAX_STRING, NBD_DEFAULT_PORT
from .errors import InvalidArgumentError

_SCHEMES = {
    "nbd": ("tcp", False),
    "nbd+tcp": ("tcp", False),
    "nbds": ("tcp", True),
    "nbds+tcp": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
}
_KNOWN_PARAMS = {"socket", "tls-hostname", "tls-verify-peer", "tls-type", "tls-certificates"}


@dataclass(frozen=True, slots=True)
class NBDAddress:
    """Where an export lives: the parsed form of an NBD URI."""

    transport: str  # "tcp" or "unix"
    export: str = ""
    host: str | None = None
    port: int | None = None
    socket: str | None = None
    tls: bool = False
    tls_hostname: str | None = None
    tls_verify_peer: bool = True
    tls_certificates: str | None = None

    def __str__(self) -> str:
        scheme = ("nbds" if self.tls else "nbd") + ("+unix" if self.transport == "unix" else "")
        path = "/" + quote(self.export, safe="") if self.export else "/"
        query: list[str] = []
        if self.transport == "unix":
            authority = ""
            query.append("socket=" + quote(self.socket or "", safe="/"))
        else:
            host = self.host or ""
            if ":" in host:
                host = f"[{host}]"
            authority = host if self.port == NBD_DEFAULT_PORT else f"{host}:{self.port}"
        if self.tls_hostname:
            query.append("tls-hostname=" + quote(self.tls_hostname, safe=""))
        if not self.tls_verify_peer:
            query.append("tls-verify-peer=0")
        if self.tls_certificates:
            query.append("tls-certificates=" + quote(self.tls_certificates, safe="/"))
        return f"{scheme}://{authority}{path}" + ("?" + "&".join(query) if query else "")

    @property
    def display(self) -> str:
        """Short human form for messages: host:port or the socket path."""
        if self.transport == "unix":
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def is_nbd_uri(text: str) -> bool:
    """True if ``text`` starts with an NBD URI scheme (``parse_uri`` may still refuse
    the rest); false for a local path."""
    return text.split(":", 1)[0].lower() in _SCHEMES


def parse_uri(text: str) -> NBDAddress:
    """Parse an NBD URI; InvalidArgumentError naming the problem if it is bad."""
    if not isinstance(text, str):
        raise InvalidArgumentError(f"NBD URI must be a string, not {type(text).__name__}")
    if not text:
        raise InvalidArgumentError("empty NBD URI")
    if "://" not in text:
        raise InvalidArgumentError(f"not an NBD URI (expected e.g. nbd://host/export): {text!r}")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL", a host that is not an address
        raise InvalidArgumentError(f"malformed NBD URI {text!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise InvalidArgumentError(f"unsupported URI scheme {parts.scheme!r} in {text!r} "
                         f"(use one of: {', '.join(sorted(_SCHEMES))})")
    transport, tls = _SCHEMES[scheme]
    if parts.fragment:
        raise InvalidArgumentError(f"NBD URI must not have a fragment: {text!r}")

    path = parts.path
    if path and not path.startswith("/"):
        raise InvalidArgumentError(f"bad export path {path!r} in {text!r}")
    try:
        export = unquote(path[1:], errors="strict") if path else ""
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"export name in {text!r} is not UTF-8 once "
                                   "percent-decoded") from None
    if "\0" in export:
        raise InvalidArgumentError("export name contains a NUL character")
    if len(export.encode("utf-8")) > MAX_STRING:
        raise InvalidArgumentError(f"export name is longer than {MAX_STRING} bytes")

    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True,
                          strict_parsing=bool(parts.query), errors="strict")
    except ValueError:  # (UnicodeDecodeError too: a value is not UTF-8 once decoded)
        raise InvalidArgumentError(f"malformed query string {parts.query!r} in {text!r}") from None
    for key, value in pairs:
        if key.startswith("x-"):
            continue
        if key not in _KNOWN_PARAMS:
            raise InvalidArgumentError(f"unknown NBD URI query parameter {key!r} in {text!r}")
        if key in params:
            raise InvalidArgumentError(f"query parameter {key!r} given twice in {text!r}")
        params[key] = value

    verify = params.get("tls-verify-peer", "1")
    if verify not in ("0", "1"):
        raise InvalidArgumentError(f"tls-verify-peer must be 0 or 1, not {verify!r}")
    tls_type = params.get("tls-type", "x509")
    if tls_type != "x509":
        raise InvalidArgumentError(f"tls-type {tls_type!r} is not supported (only x509)")
    common = dict(export=export, tls=tls, tls_hostname=params.get("tls-hostname") or None,
                  tls_verify_peer=verify == "1",
                  tls_certificates=params.get("tls-certificates") or None)

    if transport == "unix":
        if parts.netloc:
            raise InvalidArgumentError(f"{scheme} URI must not name a host ({parts.netloc!r}); "
                             f"write {scheme}:///export?socket=PATH")
        sock = params.get("socket")
        if not sock:
            raise InvalidArgumentError(
                f"{scheme} URI needs a socket=PATH query parameter: {text!r}")
        return NBDAddress(transport="unix", socket=sock, **common)  # type: ignore[arg-type]

    if "socket" in params:
        raise InvalidArgumentError(f"the socket parameter is only for nbd+unix URIs: {text!r}")
    if "@" in parts.netloc:
        raise InvalidArgumentError(f"user information in NBD URIs is not supported: {text!r}")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise InvalidArgumentError(f"bad port in {text!r}: {exc}") from None
    if not host:
        raise InvalidArgumentError(f"{scheme} URI needs a host: {text!r}")
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise InvalidArgumentError(f"bad IPv6 address {host!r} in {text!r}") from None
    if port == 0:
        raise InvalidArgumentError(f"port 0 is not valid in {text!r}")
    return NBDAddress(transport="tcp", host=host, port=port or NBD_DEFAULT_PORT,
                      **common)  # type: ignore[arg-type]
