"""The wire codec of port forwarding: PORT_* frames, their numbers and the request body."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arcbox_vm.agent import protocol as p

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
M = p.MsgType
PORT_TYPES = [M.PORT_CONNECT, M.PORT_CONNECTED, M.PORT_DATA, M.PORT_EOF, M.PORT_CLOSE]


def test_port_types_are_appended_in_their_own_range():
    """New numbers only (0x40-0x44): every older type keeps its value, so older agents and
    hosts read each other's frames as before; an older agent answers unknown_type."""
    assert [int(t) for t in PORT_TYPES] == [0x40, 0x41, 0x42, 0x43, 0x44]
    assert (M.HELLO, M.EXEC, M.WINDOW, M.FILE_WRITE, M.FILE_LIST_RESULT) == (0x01, 0x10, 0x19, 0x30, 0x3A)
    assert p.PROTOCOL_VERSION == 1 and p.SUPPORTED_VERSIONS == {1}
    assert p.FEATURE_PORTS == "ports" and p.FEATURE_PORTS not in (p.FEATURE_FILES, p.FEATURE_ATTACH)


def test_data_and_json_kinds():
    assert M.PORT_DATA in p.DATA_TYPES
    assert {M.PORT_CONNECT, M.PORT_CONNECTED} <= p.JSON_TYPES
    assert not {M.PORT_DATA, M.PORT_EOF, M.PORT_CLOSE} & p.JSON_TYPES
    assert 0 < p.PORT_WINDOW <= p.INITIAL_WINDOW and p.PORT_WINDOW >= p.DATA_CHUNK


@PROPS
@given(st.sampled_from(PORT_TYPES), st.integers(1, 0xFFFFFFFF), st.binary(max_size=2000),
       st.lists(st.integers(0, 3000), max_size=6))
def test_port_frames_round_trip_any_chunking(mtype, channel, payload, cuts):
    data = p.encode_frame(mtype, channel, payload) + p.encode_window(channel, len(payload))
    dec = p.FrameDecoder()
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    out = []
    for a, b in zip(points, points[1:]):
        out.extend(dec.feed(data[a:b]))
    assert out == [p.Frame(mtype, channel, payload), p.Frame(M.WINDOW, channel, p.WINDOW_STRUCT.pack(len(payload)))]
    assert p.decode_window(out[1].payload) == len(payload)


def test_connect_body_round_trip():
    raw = p.encode_json(M.PORT_CONNECT, 7, {"port": 8080})
    (f,) = p.FrameDecoder().feed(raw)
    assert (f.type, f.channel) == (M.PORT_CONNECT, 7)
    assert p.validate_port_request(f.json()) == 8080
    assert repr(f) == "Frame(PORT_CONNECT, ch=7, 13 bytes)"


@pytest.mark.parametrize("port", [1, 80, 65535])
def test_valid_ports(port):
    assert p.validate_port_request({"port": port}) == port


@pytest.mark.parametrize("body", [{}, {"port": 0}, {"port": 65536}, {"port": -1}, {"port": "80"}, {"port": 80.0},
                                  {"port": True}, {"port": None}, {"port": [80]}])
def test_invalid_ports_are_bad_requests(body):
    with pytest.raises(p.ProtocolError) as err:
        p.validate_port_request(body)
    assert err.value.code == p.ErrorCode.BAD_REQUEST


@PROPS
@given(st.dictionaries(st.text(max_size=5), st.none() | st.booleans() | st.integers() | st.floats() | st.text()))
def test_validate_port_request_only_ever_raises_protocol_error(obj):
    try:
        port = p.validate_port_request(obj)
    except p.ProtocolError:
        return
    assert 1 <= port <= 65535
