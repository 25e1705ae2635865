"""The link contract: addresses parsed once (and written back the same), dial and listen, and the
settings the CLI hands the sidecar and the agent."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from composemirror.filters import parse_filter
from composemirror.link import (
    AGENT_LINK,
    AGENT_SOCKET,
    AgentSettings,
    FilterText,
    LinkAddress,
    LinkAddressError,
    SidecarSettings,
    TcpAddress,
    UnixAddress,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/composemirror/agent.sock", UnixAddress("/run/composemirror/agent.sock")),
        ("tcp:host.docker.internal:41000", TcpAddress("host.docker.internal", 41000)),
        ("tcp:127.0.0.1:1", TcpAddress("127.0.0.1", 1)),
        ("tcp:0.0.0.0:65535", TcpAddress("0.0.0.0", 65535)),
        ("tcp:[::1]:8080", TcpAddress("::1", 8080)),
        ("tcp:[fd00:96::21]:443", TcpAddress("fd00:96::21", 443)),
    ],
)
def test_parse_and_round_trip(text: str, expected: LinkAddress) -> None:
    address = LinkAddress.parse(text)
    assert address == expected
    assert str(address) == text
    assert LinkAddress.parse(str(address)) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "use unix:PATH or tcp:HOST:PORT"),
        ("/run/agent.sock", "use unix:PATH or tcp:HOST:PORT"),
        ("udp:1.2.3.4:53", "use unix:PATH or tcp:HOST:PORT"),
        ("unix:agent.sock", "the socket path must be absolute"),
        ("unix:", "the socket path must be absolute"),
        ("tcp:localhost", "use tcp:HOST:PORT"),
        ("tcp::8080", "use tcp:HOST:PORT"),
        ("tcp:localhost:http", "'http' is not a port"),
        ("tcp:localhost:0", "'0' is not a port"),
        ("tcp:localhost:70000", "'70000' is not a port"),
        ("tcp:::1:80", "IPv6 address in brackets"),
        ("tcp:[nothing]:80", "'nothing' is not an IPv6 address"),
        ("tcp:[::1:80", "IPv6 address in brackets"),
    ],
)
def test_parse_errors_name_the_address_and_the_forms(text: str, message: str) -> None:
    with pytest.raises(LinkAddressError) as caught:
        LinkAddress.parse(text)
    assert repr(text) in str(caught.value)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)  # argparse reports it as a bad argument


def test_addresses_are_frozen_values() -> None:
    address = LinkAddress.parse("tcp:example:80")
    assert isinstance(address, TcpAddress)
    with pytest.raises(AttributeError):
        address.port = 81  # type: ignore[misc]
    assert hash(address) == hash(TcpAddress("example", 80))


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def data_received(self, data: bytes) -> None:
        self.received.put_nowait(data)


async def exchange(listen_at: LinkAddress, dial_at: LinkAddress) -> bytes:
    server = await listen_at.listen(Echo)
    async with server:
        transport, client = await dial_at.dial(Client)
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"ping")
        answer = await asyncio.wait_for(client.received.get(), 5)
        transport.close()
        return answer


def test_unix_listen_and_dial(tmp_path: Path) -> None:
    address = UnixAddress(str(tmp_path / "link" / "agent.sock"))
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "agent.sock").write_text("stale")  # a socket left by a previous agent
    assert asyncio.run(exchange(address, address)) == b"PING"
    assert (tmp_path / "link" / "agent.sock").stat().st_mode & 0o777 == 0o660


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_tcp_listen_and_dial_by_name() -> None:
    port = free_port()
    answer = asyncio.run(exchange(TcpAddress("localhost", port), TcpAddress("localhost", port)))
    assert answer == b"PING"


def test_tcp_dial_refused_is_an_oserror() -> None:
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(TcpAddress("127.0.0.1", free_port()).dial(Client, mark=None))


def test_sidecar_settings_round_trip_through_json() -> None:
    outgoing = FilterText.of(parse_filter("local", ["tcp://db:5432", "*.internal"], protocols=True))
    settings = SidecarSettings(
        service="web",
        link=LinkAddress.parse("tcp:host.docker.internal:41000"),
        names=("web", "db"),
        hosts={"postgres.shop": "db"},
        udp=False,
        outgoing=outgoing,
        dns=FilterText(mode="remote", entries=("*.svc.cluster.local",)),
    )
    text = settings.to_json()
    assert '"link":"tcp:host.docker.internal:41000"' in text
    again = SidecarSettings.from_json(text)
    assert again == settings
    assert again.outgoing is not None
    assert again.outgoing.parse(protocols=True).mode == "local"


def test_sidecar_settings_default_to_the_local_agent() -> None:
    settings = SidecarSettings.from_json(SidecarSettings(service="web").to_json())
    assert settings.link == AGENT_LINK == UnixAddress(AGENT_SOCKET)
    assert FilterText.of(None) is None


def test_agent_command_leaves_defaults_out() -> None:
    assert AgentSettings().command() == [
        "python3",
        "-m",
        "composemirror.agent",
        "--listen",
        f"unix:{AGENT_SOCKET}",
    ]
    custom = AgentSettings(
        listen=TcpAddress("127.0.0.1", 7000), key_file="/key", resolv_conf="/tmp/resolv.conf"
    )
    assert custom.command("python") == [
        "python",
        "-m",
        "composemirror.agent",
        "--listen",
        "tcp:127.0.0.1:7000",
        "--key-file",
        "/key",
        "--resolv-conf",
        "/tmp/resolv.conf",
    ]


@pytest.mark.parametrize(
    "settings",
    [
        AgentSettings(),
        AgentSettings(listen=TcpAddress("127.0.0.1", 7000), key_file="/key"),
        AgentSettings(resolv_conf="/tmp/resolv.conf"),
        AgentSettings(handshake_timeout=2.5, max_lookups=32),
    ],
)
def test_the_agent_reads_back_the_command_it_is_given(settings: AgentSettings) -> None:
    assert AgentSettings.from_args(settings.command()[3:]) == settings


def test_the_agent_refuses_a_bad_link_address(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        AgentSettings.from_args(["--listen", "udp:1.2.3.4:53"])
    assert caught.value.code == 2
    assert "link address 'udp:1.2.3.4:53': use unix:PATH or tcp:HOST:PORT" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--handshake-timeout", "0"], "'0': must be above zero"),
        (["--handshake-timeout", "soon"], "'soon' is not a number"),
        (["--max-lookups", "-1"], "'-1': must be above zero"),
    ],
)
def test_the_agent_refuses_limits_that_are_not_positive(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        AgentSettings.from_args(args)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err
