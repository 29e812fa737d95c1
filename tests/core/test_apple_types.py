"""Raw values and shapes of the NE mirrors."""

from __future__ import annotations

import pytest

from netsim.apple import (
    AF_INET,
    AF_INET6,
    FlowMetaData,
    Packet,
    ProviderStopReason,
    RoutingMethod,
    TrafficDirection,
    TunnelProviderError,
    TunnelProviderErrorCode,
    TunnelProviderProtocol,
    VPNStatus,
    family_for_version,
    version_for_family,
)


def test_raw_values_follow_the_sdk_headers() -> None:
    assert [int(m) for m in ProviderStopReason] == list(range(18))
    assert ProviderStopReason.SUPERCEDED == 11 and ProviderStopReason.SLEEP == 15
    assert ProviderStopReason.APP_UPDATE == 16 and ProviderStopReason.INTERNAL_ERROR == 17
    assert [(m.name, int(m)) for m in VPNStatus] == [
        ("INVALID", 0),
        ("DISCONNECTED", 1),
        ("CONNECTING", 2),
        ("CONNECTED", 3),
        ("REASSERTING", 4),
        ("DISCONNECTING", 5),
    ]
    assert [int(m) for m in TunnelProviderErrorCode] == [1, 2, 3]
    assert [int(m) for m in TrafficDirection] == [0, 1, 2]
    assert [int(m) for m in RoutingMethod] == [1, 2, 3]


def test_darwin_families() -> None:
    assert (AF_INET, AF_INET6) == (2, 30)
    assert family_for_version(4) == 2 and family_for_version(6) == 30 and family_for_version(5) is None
    assert version_for_family(30) == 6 and version_for_family(10) is None


def test_packet_is_light_and_compares_by_value() -> None:
    p = Packet(b"\x45" + bytes(19), AF_INET)
    assert p.direction is TrafficDirection.ANY and p.metadata is None
    assert not hasattr(p, "__dict__")
    meta = FlowMetaData(source_app_signing_identifier="com.example.app")
    assert Packet(bytearray(b"\x45"), 2, TrafficDirection.OUTBOUND, meta) == Packet(
        b"\x45", 2, TrafficDirection.OUTBOUND, meta
    )
    assert Packet(b"\x45", 2) != Packet(b"\x45", 30)
    with pytest.raises(TypeError):
        hash(p)
    assert "20 bytes" in repr(p)


def test_error_carries_code_and_domain() -> None:
    e = TunnelProviderError(TunnelProviderErrorCode.NETWORK_SETTINGS_FAILED, "kernel said no")
    assert e.code == 3 and e.domain == "NETunnelProviderErrorDomain"
    assert "NETWORK_SETTINGS_FAILED (3): kernel said no" == str(e)


def test_protocol_round_trips_and_keeps_provider_configuration() -> None:
    conf = {"key": [1, 2, {"nested": "x"}], "n": None}
    proto = TunnelProviderProtocol(server_address="203.0.113.5", provider_configuration=conf, enforce_routes=True)
    back = TunnelProviderProtocol.from_dict(proto.to_dict())
    assert back == proto and back.provider_configuration == conf
    assert back.routing_method is RoutingMethod.DESTINATION_IP
