"""The host<->controller control channel: JSON lines fed whole, byte by byte, and broken."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.errors import RemoteProtocolError
from netsim.runtime.provider import MAX_CONTROL_LINE, JsonLinesChannel

messages = st.lists(
    st.dictionaries(st.text(max_size=5), st.one_of(st.none(), st.integers(), st.text(max_size=20)), max_size=4),
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(messages, st.integers(1, 7))
def test_messages_survive_any_chunking(msgs: list[dict[str, object]], chunk: int) -> None:
    async def main() -> None:
        sender, receiver = trio.testing.memory_stream_pair()
        channel = JsonLinesChannel(receiver)
        wire = b"".join(json.dumps(m).encode() + b"\n" for m in msgs)
        for i in range(0, len(wire), chunk):
            await sender.send_all(wire[i : i + chunk])
        await sender.aclose()
        got = []
        with pytest.raises(trio.EndOfChannel):
            while True:
                got.append(await channel.receive())
        assert got == msgs

    trio.run(main)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [(b"{not json}\n", "bad_json"), (b"[1, 2]\n", "not_an_object"), (b'{"op": "start"}', "truncated")],
)
def test_garbage_is_a_remote_protocol_error(wire: bytes, reason: str) -> None:
    async def main() -> None:
        sender, receiver = trio.testing.memory_stream_pair()
        await sender.send_all(wire)
        await sender.aclose()
        with pytest.raises(RemoteProtocolError) as info:
            await JsonLinesChannel(receiver).receive()
        assert info.value.reason == reason

    trio.run(main)


def test_overlong_line_is_refused_without_buffering_forever() -> None:
    async def main() -> None:
        sender, receiver = trio.testing.memory_stream_pair()
        channel = JsonLinesChannel(receiver)
        async with trio.open_nursery() as nursery:

            async def flood() -> None:
                chunk = b"x" * 65536
                for _ in range(MAX_CONTROL_LINE // len(chunk) + 2):
                    await sender.send_all(chunk)

            nursery.start_soon(flood)
            with pytest.raises(RemoteProtocolError) as info:
                await channel.receive()
            assert info.value.reason == "line_too_long"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_round_trip_over_a_socket_pair() -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        left, right = JsonLinesChannel(a), JsonLinesChannel(b)
        await left.send({"op": "message", "id": 1, "data": "aGk="})
        assert await right.receive() == {"op": "message", "id": 1, "data": "aGk="}
        await left.aclose()
        with pytest.raises(trio.EndOfChannel):
            await right.receive()

    trio.run(main)
