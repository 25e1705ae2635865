"""The link contract between the CLI, the sidecars and the agent, in one neutral place.

It owns the paths both ends agree on, the settings each process is handed at start, and the link
address: parsed once from `unix:PATH` or `tcp:HOST:PORT` into a frozen value that can dial and
listen, so a new form is a new class here and no change in the sidecar or the agent. Stdlib and
`composemirror.filters` only: no Docker, no Kubernetes, no sidecar or agent internals.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from composemirror.filters import Filter, Mode, parse_filter

ENV_VAR = "COMPOSEMIRROR_SETTINGS"
"""The sidecar's environment variable that holds its `SidecarSettings` as JSON."""
LINK_DIR = "/run/composemirror"
"""Where a sidecar and a local agent share the agent's socket (a volume the app never mounts)."""
AGENT_SOCKET = f"{LINK_DIR}/agent.sock"
KEY_FILE = "/run/secrets/composemirror-key"
"""The tunnel key inside the sidecar and agent containers (a compose secret)."""
READY_FILE = "/run/composemirror-ready"
"""Present while the sidecar's interception rules are in place and its link to the agent is up
(or down for a few seconds only): its healthcheck, so the app waits for it and Docker shows it."""
STATUS_FILE = "/run/composemirror-status.json"
"""The sidecar's report, read by `composemirror status`: a JSON object with the link (`agent`:
connecting, connected or disconnected, `error`, `connects`, `streams`), the interception rules
(`rules`: `state` "in place" or "failed", `checked` and `restored_at` as Unix times, `restored`
a count, `drift` what was found missing, `error`) and `counters`."""
RESOLV_CONF = "/etc/resolv.conf"
"""The resolver configuration the agent answers with: the target's."""
HANDSHAKE_TIMEOUT = 5.0
"""Seconds a connection to the agent has to authenticate (the agent's default)."""
MAX_LOOKUPS = 256
"""DNS lookups the agent runs at once (its default)."""

_Proto = TypeVar("_Proto", bound=asyncio.BaseProtocol)


class LinkAddressError(ValueError):
    """A link address that is not `unix:PATH` or `tcp:HOST:PORT`."""


@dataclass(frozen=True, slots=True)
class LinkAddress(ABC):
    """Where an agent listens and a sidecar dials. `parse()` is the one way in from text."""

    scheme: ClassVar[str]
    example: ClassVar[str]
    """The form, for messages: `unix:PATH`."""

    @staticmethod
    def parse(text: str) -> LinkAddress:
        """`unix:PATH` or `tcp:HOST:PORT` (`tcp:[::1]:PORT` for IPv6) as a value."""
        scheme, colon, rest = text.partition(":")
        form = _FORMS.get(scheme)
        if not colon or form is None:
            forms = " or ".join(f.example for f in _FORMS.values())
            raise LinkAddressError(f"link address {text!r}: use {forms}")
        return form.from_text(text, rest)

    @classmethod
    @abstractmethod
    def from_text(cls, text: str, rest: str) -> LinkAddress:
        """The address written `text`, whose part after the scheme is `rest`."""

    @abstractmethod
    async def dial(
        self, factory: Callable[[], _Proto], *, mark: int | None = None
    ) -> tuple[asyncio.BaseTransport, _Proto]:
        """Connect, with `factory`'s protocol on the stream; `mark` sets SO_MARK where it can."""

    @abstractmethod
    async def listen(
        self, factory: Callable[[], asyncio.BaseProtocol], *, backlog: int = 512
    ) -> asyncio.Server:
        """Serve connections here, each with a new protocol from `factory`."""


@dataclass(frozen=True, slots=True)
class UnixAddress(LinkAddress):
    """`unix:PATH`: a socket file, shared through a volume."""

    path: str
    scheme: ClassVar[str] = "unix"
    example: ClassVar[str] = "unix:PATH"

    @classmethod
    def from_text(cls, text: str, rest: str) -> LinkAddress:
        if not rest.startswith("/"):
            raise LinkAddressError(f"link address {text!r}: the socket path must be absolute")
        return cls(rest)

    def __str__(self) -> str:
        return f"unix:{self.path}"

    async def dial(
        self, factory: Callable[[], _Proto], *, mark: int | None = None
    ) -> tuple[asyncio.BaseTransport, _Proto]:
        loop = asyncio.get_running_loop()
        return await loop.create_unix_connection(factory, self.path)

    async def listen(
        self, factory: Callable[[], asyncio.BaseProtocol], *, backlog: int = 512
    ) -> asyncio.Server:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(factory, self.path, backlog=backlog)
        os.chmod(path, 0o660)
        return server


@dataclass(frozen=True, slots=True)
class TcpAddress(LinkAddress):
    """`tcp:HOST:PORT`: a name or address and a port (`0.0.0.0` listens on every interface)."""

    host: str
    port: int
    scheme: ClassVar[str] = "tcp"
    example: ClassVar[str] = "tcp:HOST:PORT"

    @classmethod
    def from_text(cls, text: str, rest: str) -> LinkAddress:
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            raise LinkAddressError(
                f"link address {text!r}: use tcp:HOST:PORT (tcp:[ADDRESS]:PORT for IPv6)"
            )
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise LinkAddressError(
                    f"link address {text!r}: {host!r} is not an IPv6 address"
                ) from None
        elif ":" in host or "[" in host or "]" in host:
            raise LinkAddressError(
                f"link address {text!r}: write an IPv6 address in brackets, tcp:[ADDRESS]:PORT"
            )
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise LinkAddressError(f"link address {text!r}: {port!r} is not a port (1-65535)")
        return cls(host, int(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    async def dial(
        self, factory: Callable[[], _Proto], *, mark: int | None = None
    ) -> tuple[asyncio.BaseTransport, _Proto]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return await loop.create_connection(factory, sock=sock)

    async def listen(
        self, factory: Callable[[], asyncio.BaseProtocol], *, backlog: int = 512
    ) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(factory, self.host, self.port, backlog=backlog)


_FORMS: dict[str, type[LinkAddress]] = {form.scheme: form for form in (UnixAddress, TcpAddress)}
"""Every form `LinkAddress.parse` knows, by scheme: a new form is a class and an entry here."""

AGENT_LINK: LinkAddress = UnixAddress(AGENT_SOCKET)
"""Where an agent on this engine listens: the socket in the volume it shares with the sidecars."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterText:
    """A filter as the user wrote it: `mode` and its entries."""

    mode: Mode
    entries: tuple[str, ...]

    def parse(self, *, protocols: bool) -> Filter:
        return parse_filter(self.mode, self.entries, protocols=protocols)

    @classmethod
    def of(cls, parsed: Filter | None) -> FilterText | None:
        if parsed is None:
            return None
        return cls(mode=parsed.mode, entries=tuple(r.text for r in parsed.rules))


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarSettings:
    """Everything a sidecar needs to own one app's DNS and egress; JSON in `ENV_VAR`.

    Plain data only; filter entries travel as the user's text and are parsed with
    `composemirror.filters` in the sidecar.
    """

    service: str
    """The compose service this sidecar serves (for logs and status)."""
    link: LinkAddress = AGENT_LINK
    """Where the agent listens (or the host-side forwarder that reaches it)."""
    key_file: str = KEY_FILE
    names: tuple[str, ...] = ()
    """The project's own names (services, aliases, containers, extra_hosts, `hosts` keys)."""
    hosts: Mapping[str, str] = field(default_factory=dict)
    """Host name -> compose service whose address answers for it."""
    tcp: bool = True
    udp: bool = True
    outgoing: FilterText | None = None
    dns_enabled: bool = True
    dns: FilterText | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["link"] = str(self.link)
        data["hosts"] = dict(self.hosts)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SidecarSettings:
        data: dict[str, Any] = json.loads(text)
        for key in ("outgoing", "dns"):
            if data.get(key) is not None:
                data[key] = FilterText(mode=data[key]["mode"], entries=tuple(data[key]["entries"]))
        data["names"] = tuple(data.get("names", ()))
        if "link" in data:
            data["link"] = LinkAddress.parse(data["link"])
        return cls(**data)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    """What the agent is told at start, as its command line (`python3 -m composemirror.agent`)."""

    listen: LinkAddress = AGENT_LINK
    """Where it serves tunnels."""
    key_file: str = KEY_FILE
    resolv_conf: str = RESOLV_CONF
    """The resolver configuration it answers DNS queries with."""
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    """Seconds a new connection has to prove the key before it is dropped."""
    max_lookups: int = MAX_LOOKUPS
    """DNS lookups in flight at once; queries beyond are answered SERVFAIL at once."""

    def command(self, python: str = "python3") -> list[str]:
        """The agent's command line; options at their defaults are left out."""
        argv = [python, "-m", "composemirror.agent", "--listen", str(self.listen)]
        if self.key_file != KEY_FILE:
            argv += ["--key-file", self.key_file]
        if self.resolv_conf != RESOLV_CONF:
            argv += ["--resolv-conf", self.resolv_conf]
        if self.handshake_timeout != HANDSHAKE_TIMEOUT:
            argv += ["--handshake-timeout", f"{self.handshake_timeout:g}"]
        if self.max_lookups != MAX_LOOKUPS:
            argv += ["--max-lookups", str(self.max_lookups)]
        return argv

    @classmethod
    def from_args(cls, args: Sequence[str] | None = None) -> AgentSettings:
        """The settings back from the agent's arguments (`command()` without its first three);
        a bad argument exits with argparse's usage message."""
        parser = argparse.ArgumentParser(prog="composemirror.agent")
        parser.add_argument(
            "--listen", type=_link_argument, default=AGENT_LINK, help="unix:PATH or tcp:HOST:PORT"
        )
        parser.add_argument("--key-file", default=KEY_FILE)
        parser.add_argument("--resolv-conf", default=RESOLV_CONF)
        parser.add_argument(
            "--handshake-timeout",
            type=_positive(float),
            default=HANDSHAKE_TIMEOUT,
            metavar="SECONDS",
            help="drop a connection that has not authenticated by then",
        )
        parser.add_argument(
            "--max-lookups",
            type=_positive(int),
            default=MAX_LOOKUPS,
            metavar="N",
            help="DNS lookups in flight at once (beyond: SERVFAIL)",
        )
        parsed = parser.parse_args(args)
        return cls(
            listen=parsed.listen,
            key_file=parsed.key_file,
            resolv_conf=parsed.resolv_conf,
            handshake_timeout=parsed.handshake_timeout,
            max_lookups=parsed.max_lookups,
        )


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` when it is above zero, else a usage error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be above zero")
        return value

    return parse


def _link_argument(text: str) -> LinkAddress:
    try:
        return LinkAddress.parse(text)
    except LinkAddressError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
