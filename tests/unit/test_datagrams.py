"""Datagram flows without sockets: the one idle expiry, and a stream flow's holding rules."""

from __future__ import annotations

from composemirror.datagrams import BACKLOG, Flow, FlowTable, StreamFlow


class Recorded(StreamFlow):
    def __init__(self) -> None:
        super().__init__()
        self.local: list[bytes] = []
        self.drops = 0
        self.released = 0

    def send_local(self, data: bytes) -> None:
        self.local.append(data)

    def dropped(self) -> None:
        self.drops += 1

    def release(self) -> None:
        self.released += 1
        super().release()


def test_only_flows_idle_longer_than_the_timeout_are_closed_and_forgotten() -> None:
    table = FlowTable(idle_timeout=60)
    old, fresh = Recorded(), Recorded()
    table.add(old, "old")
    table.add(fresh, "fresh")
    old.last_active, fresh.last_active = 100.0, 150.0

    closed: list[Flow] = table.close_idle(now=200.0)

    assert closed == [old] and old.closed and old.released == 1
    assert table.get("old") is None and table.get("fresh") is fresh and len(table) == 1


def test_a_closed_flow_is_released_once() -> None:
    table = FlowTable()
    flow = Recorded()
    table.add(flow)
    flow.close()
    flow.close()
    table.close_all()
    assert flow.released == 1 and len(table) == 0


def test_datagrams_wait_for_their_side_and_the_oldest_are_dropped_beyond_the_backlog() -> None:
    flow = Recorded()
    for n in range(BACKLOG + 2):
        flow.to_stream(b"%d" % n)
    flow.deliver(b"answer")
    assert flow.drops == 2 and flow.outbound[0] == b"2"
    assert flow.local == []
    flow.local_ready()
    assert flow.local == [b"answer"]


def test_a_reset_from_the_peer_ends_the_flow() -> None:
    table = FlowTable()
    flow = Recorded()
    table.add(flow)
    flow.peer_reset()
    flow.deliver(b"late")
    assert flow.closed and len(table) == 0 and flow.local == []
