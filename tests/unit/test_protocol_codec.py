"""The wire codec (arcbox_vm.agent.protocol): round trips, truncation, oversized frames,
garbage and resynchronisation, plus the message-body helpers.

Property tests use modest example counts and no deadline: this runs on small, busy CI
machines and must not flake.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arcbox_vm.agent import protocol as p

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

frames_st = st.builds(
    p.Frame,
    st.integers(0, 255),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=600),
)


def encode(f: p.Frame) -> bytes:
    return p.encode_frame(f.type, f.channel, f.payload)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the given (unsorted, possibly out of range) positions."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def feed_all(dec: p.FrameDecoder, pieces: list[bytes]) -> list:
    out = []
    for piece in pieces:
        out.extend(dec.feed(piece))
    return out


# ---- round trip ------------------------------------------------------------------------


@PROPS
@given(st.lists(frames_st, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_round_trip_any_chunking(frames, cuts):
    stream = b"".join(encode(f) for f in frames)
    dec = p.FrameDecoder()
    out = feed_all(dec, chunked(stream, cuts))
    assert out == frames
    assert all(isinstance(f, p.Frame) for f in out)
    assert dec.buffered == 0
    assert dec.eof() is None


@PROPS
@given(st.lists(frames_st, min_size=1, max_size=3))
def test_round_trip_byte_at_a_time(frames):
    stream = b"".join(encode(f) for f in frames)
    dec = p.FrameDecoder()
    out = feed_all(dec, [stream[i : i + 1] for i in range(len(stream))])
    assert out == frames


@PROPS
@given(st.lists(frames_st, max_size=8), st.lists(st.integers(0, 10_000), max_size=12),
       st.lists(st.binary(max_size=40), max_size=3))
def test_reused_receive_buffer_gives_the_same_frames(frames, cuts, garbage):
    """The guest feeds views of one receive buffer that the next read overwrites: frames
    (and errors) must be what bytes give, each payload intact after the overwrite, and
    only the ``views`` types may come as views (valid until the overwrite)."""
    stream = b"".join(garbage) + b"".join(encode(f) for f in frames)
    pieces = chunked(stream, cuts)
    expected = [(type(x), getattr(x, "type", None), getattr(x, "payload", None)) for x in
                feed_all(p.FrameDecoder(), pieces)]
    dec = p.FrameDecoder(views=frozenset({0x32}))
    got = []
    buf = bytearray(max((len(x) for x in pieces), default=0))
    for piece in pieces:
        buf[: len(piece)] = piece
        for x in dec.feed(memoryview(buf)[: len(piece)]):
            payload = getattr(x, "payload", None)
            if payload is not None and x.type != 0x32:
                assert type(payload) is bytes
            got.append((type(x), getattr(x, "type", None), None if payload is None else bytes(payload)))
        buf[:] = bytes(len(buf))  # the next read overwrites the buffer
    assert got == expected


def test_a_straddling_view_frame_is_a_view_of_its_own_buffer():
    frame = encode(p.Frame(0x32, 7, b"x" * 1000))
    dec = p.FrameDecoder(views=frozenset({0x32}))
    buf = bytearray(frame[:300])
    assert dec.feed(memoryview(buf)) == []
    buf[:] = bytes(300)  # overwritten: the decoder kept its own copy of the tail
    rest = bytearray(frame[300:] + encode(p.Frame(0x32, 8, b"y")))
    first, second = dec.feed(memoryview(rest))
    assert first.payload == b"x" * 1000 and first.channel == 7
    assert second.payload == b"y" and second.payload.obj is rest  # a view of the fed data itself
    assert dec.buffered == 0


def test_header_layout_is_the_documented_one():
    raw = p.encode_frame(p.MsgType.STDOUT, 7, b"hey")
    assert raw == b"AV" + bytes([0x14, 0]) + (7).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"hey"
    assert p.HEADER_SIZE == 12


def test_empty_payload_and_flags_ignored():
    raw = bytearray(p.encode_frame(p.MsgType.STDIN_EOF, 3))
    raw[3] = 0x80  # reserved flags: readers ignore them
    [f] = p.FrameDecoder().feed(bytes(raw))
    assert (f.type, f.channel, f.payload, f.flags) == (p.MsgType.STDIN_EOF, 3, b"", 0x80)


@PROPS
@given(
    st.dictionaries(st.text(max_size=10), st.one_of(st.integers(), st.text(max_size=20), st.booleans(), st.none()), max_size=6),
    st.integers(0, 0xFFFFFFFF),
)
def test_json_frames_round_trip(body, channel):
    [f] = p.FrameDecoder().feed(p.encode_json(p.MsgType.EXEC, channel, body))
    assert f.channel == channel and f.json() == body


@PROPS
@given(st.integers(0, 0xFFFFFFFF))
def test_window_round_trip(n):
    [f] = p.FrameDecoder().feed(p.encode_window(5, n))
    assert f.type == p.MsgType.WINDOW and p.decode_window(f.payload) == n


# ---- truncated input ----------------------------------------------------------------------


@PROPS
@given(st.lists(frames_st, min_size=1, max_size=5), st.data())
def test_truncated_stream_yields_complete_frames_then_eof_error(frames, data):
    encoded = [encode(f) for f in frames]
    stream = b"".join(encoded)
    cut = data.draw(st.integers(0, len(stream)))
    dec = p.FrameDecoder()
    out = dec.feed(stream[:cut])
    # exactly the frames that fit completely before the cut
    ends, pos = [], 0
    for e in encoded:
        pos += len(e)
        ends.append(pos)
    complete = sum(1 for end in ends if end <= cut)
    assert out == frames[:complete]
    err = dec.eof()
    if cut in ends or cut == 0:
        assert err is None
    else:
        assert isinstance(err, p.DecodeError) and err.code == p.ErrorCode.BAD_FRAME
    assert dec.buffered == 0  # eof() resets


def test_eof_inside_skipped_oversized_payload_is_reported():
    dec = p.FrameDecoder(max_payload=4)
    out = dec.feed(p.HEADER.pack(p.MAGIC, p.MsgType.STDIN, 0, 9, 100) + b"x" * 10)
    assert [e.code for e in out] == [p.ErrorCode.OVERSIZED]
    assert dec.eof().code == p.ErrorCode.BAD_FRAME


# ---- oversized frames ---------------------------------------------------------------------


@PROPS
@given(
    st.lists(frames_st.filter(lambda f: len(f.payload) <= 64), max_size=3),
    st.integers(65, 3000),
    st.integers(1, 0xFFFFFFFF),
    st.lists(frames_st.filter(lambda f: len(f.payload) <= 64), max_size=3),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_oversized_frame_is_reported_and_skipped(before, size, channel, after, cuts):
    big = p.HEADER.pack(p.MAGIC, p.MsgType.STDIN, 0, channel, size) + b"\xaa" * size
    stream = b"".join(encode(f) for f in before) + big + b"".join(encode(f) for f in after)
    dec = p.FrameDecoder(max_payload=64)
    out = []
    for piece in chunked(stream, cuts):
        out.extend(dec.feed(piece))
        assert dec.buffered <= p.HEADER_SIZE + 64 + len(piece)  # never holds the big payload
    errors = [x for x in out if isinstance(x, p.DecodeError)]
    assert len(errors) == 1
    assert errors[0].code == p.ErrorCode.OVERSIZED and errors[0].channel == channel
    assert [x for x in out if isinstance(x, p.Frame)] == before + after
    assert dec.eof() is None


def test_encode_refuses_out_of_range_fields():
    with pytest.raises(ValueError):
        p.encode_frame(256, 0)
    with pytest.raises(ValueError):
        p.encode_frame(-1, 0)
    with pytest.raises(ValueError):
        p.encode_frame(1, 1 << 32)
    with pytest.raises(ValueError):
        p.encode_frame(1, 0, b"x" * 11, max_payload=10)


# ---- garbage and resync ---------------------------------------------------------------------


@PROPS
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_garbage_never_raises_and_memory_stays_bounded(chunks):
    dec = p.FrameDecoder(max_payload=128)
    for c in chunks:
        for item in dec.feed(c):
            assert isinstance(item, (p.Frame, p.DecodeError))
            if isinstance(item, p.Frame):
                assert len(item.payload) <= 128
        # holds at most one header + max_payload, plus a trailing byte during resync
        assert dec.buffered <= p.HEADER_SIZE + 128
    err = dec.eof()
    assert err is None or isinstance(err, p.DecodeError)


no_magic_garbage = st.binary(min_size=1, max_size=200).map(lambda b: b.replace(b"A", b"a")).filter(lambda b: b[:2] != p.MAGIC)


@PROPS
@given(no_magic_garbage, st.lists(frames_st, min_size=1, max_size=4), st.lists(st.integers(0, 10_000), max_size=10))
def test_resync_after_garbage(garbage, frames, cuts):
    stream = garbage + b"".join(encode(f) for f in frames)
    dec = p.FrameDecoder()
    out = feed_all(dec, chunked(stream, cuts))
    errors = [x for x in out if isinstance(x, p.DecodeError)]
    assert [e.code for e in errors] == [p.ErrorCode.BAD_FRAME]
    assert [x for x in out if isinstance(x, p.Frame)] == frames


@PROPS
@given(no_magic_garbage, frames_st, no_magic_garbage, frames_st)
def test_each_garbage_run_is_one_error(g1, f1, g2, f2):
    stream = g1 + encode(f1) + g2 + encode(f2)
    out = p.FrameDecoder().feed(stream)
    assert [type(x).__name__ for x in out] == ["DecodeError", "Frame", "DecodeError", "Frame"]
    assert [x for x in out if isinstance(x, p.Frame)] == [f1, f2]


def test_resync_when_garbage_ends_with_half_a_magic():
    frame = p.encode_frame(p.MsgType.PING, 0, b"ok")
    dec = p.FrameDecoder()
    out = dec.feed(b"xyzA")  # the trailing "A" may start a magic: kept
    out += dec.feed(frame)
    assert [type(x).__name__ for x in out] == ["DecodeError", "Frame"]
    assert out[1].payload == b"ok"


def test_bad_magic_right_at_the_start():
    out = p.FrameDecoder().feed(b"XY" + p.encode_frame(p.MsgType.PING, 0, b"1"))
    assert out[0].code == p.ErrorCode.BAD_FRAME and out[1].payload == b"1"


# ---- JSON bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe", b"{", b"[]", b"42", b'"s"', b"null", b"[" * 100_000 + b"]" * 100_000, b""],
)
def test_decode_json_rejects_bad_payloads_with_bad_request(payload):
    with pytest.raises(p.ProtocolError) as exc:
        p.decode_json(payload)
    assert exc.value.code == p.ErrorCode.BAD_REQUEST


def test_decode_window_wrong_size():
    with pytest.raises(p.ProtocolError) as exc:
        p.decode_window(b"\x00\x01")
    assert exc.value.code == p.ErrorCode.BAD_REQUEST


def test_exec_request_defaults_validate_to_themselves():
    body = p.exec_request(["ls", "-l"])
    assert p.validate_exec_request(json.loads(json.dumps(body))) == body
    minimal = p.validate_exec_request({"argv": ["true"]})
    assert minimal == p.exec_request(["true"])


def test_exec_request_keeps_given_fields():
    body = p.exec_request(
        ["sh"], env={"A": "1"}, cwd="/tmp", user="1000:1000", tty=True, rows=50, cols=120, timeout=2.5, stdin=True
    )
    assert p.validate_exec_request(body) == body


@pytest.mark.parametrize(
    "patch",
    [
        {"argv": []},
        {"argv": "ls"},
        {"argv": ["ls", 3]},
        {"argv": ["l\x00s"]},
        {"env": {"A": 1}},
        {"env": {"": "x"}},
        {"env": {"A=B": "x"}},
        {"env": ["A"]},
        {"cwd": 5},
        {"cwd": "/tm\x00p"},
        {"user": None},
        {"tty": "false"},
        {"stdin": 1},
        {"rows": 0},
        {"cols": 70000},
        {"rows": True},
        {"rows": 2.5},
        {"timeout": -1},
        {"timeout": True},
        {"timeout": "5"},
        {"timeout": float("nan")},
        {"timeout": float("inf")},
    ],
)
def test_exec_request_rejects_bad_shapes(patch):
    body = dict(p.exec_request(["ls"]), **patch)
    with pytest.raises(p.ProtocolError) as exc:
        p.validate_exec_request(body)
    assert exc.value.code == p.ErrorCode.BAD_REQUEST


def test_nan_timeout_in_json_text_is_rejected():
    obj = p.decode_json(b'{"argv":["x"],"timeout":NaN}')
    assert math.isnan(obj["timeout"])
    with pytest.raises(p.ProtocolError):
        p.validate_exec_request(obj)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
exec_like = st.fixed_dictionaries(
    {},
    optional={
        "argv": json_values | st.lists(st.text(max_size=5), max_size=3),
        "env": json_values | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
        "cwd": json_values,
        "user": json_values,
        "tty": json_values,
        "stdin": json_values,
        "rows": json_values,
        "cols": json_values,
        "timeout": json_values,
    },
)


@PROPS
@given(exec_like)
def test_validate_exec_request_only_ever_raises_protocol_error(obj):
    try:
        out = p.validate_exec_request(obj)
    except p.ProtocolError as exc:
        assert exc.code == p.ErrorCode.BAD_REQUEST
    else:
        assert isinstance(out["argv"], list) and out["argv"]
        assert isinstance(out["tty"], bool) and isinstance(out["timeout"], float)


def test_frame_repr_and_equality():
    f = p.Frame(p.MsgType.PING, 1, b"x")
    assert "PING" in repr(f) and "0x99" in repr(p.Frame(0x99, 0))
    assert f == p.Frame(p.MsgType.PING, 1, b"x", flags=3)  # flags do not matter
    assert f != p.Frame(p.MsgType.PONG, 1, b"x")


def test_message_type_values_are_unique_and_fit_a_byte():
    values = [m.value for m in p.MsgType]
    assert len(values) == len(set(values)) and all(0 <= v <= 255 for v in values)
    assert p.DATA_TYPES <= set(p.MsgType) and not (p.DATA_TYPES & p.JSON_TYPES)
