"""Contract sections 5 and 7: WebSocket protocol errors, with hand-built frames on a raw TCP
socket (the `websockets` client refuses to send most of these)."""

from __future__ import annotations

import json
import struct

import pytest

from relaylib import RawWS, async_test, ws_connect

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def raw(relay, **kw) -> RawWS:
    r = RawWS.for_relay(relay, **kw)
    assert r.status == 101, (r.status, r.headers)
    return r


def expect_close_code(r: RawWS, code: int, timeout: float = 5):
    frames, got, how = r.read_until_close(timeout)
    assert how == "close", f"expected a close frame with {code}, got {how} (no close frame)"
    assert got == code, f"close code {got}, expected {code}"
    # the relay then closes the TCP connection
    try:
        r.send_frame(CLOSE, struct.pack("!H", code))
    except OSError:
        pass
    _, _, how2 = r.read_until_close(3)
    assert how2 in ("eof", "reset", "close"), how2
    r.close()


def ping_json_of_size(n: int) -> bytes:
    head = b'{"op":"ping","pad":"'
    body = head + b"x" * (n - len(head) - 2) + b'"}'
    assert len(body) == n
    return body


# ---------------------------------------------------------------------------------------------
# 1002: protocol errors

def test_unmasked_client_frame_is_1002(relay):
    r = raw(relay)
    r.send_frame(TEXT, b'{"op":"ping"}', mask=False)
    expect_close_code(r, 1002)


@pytest.mark.parametrize("rsv", [4, 2, 1], ids=["RSV1", "RSV2", "RSV3"])
def test_rsv_bit_without_extension_is_1002(relay, rsv):
    r = raw(relay)
    r.send_frame(TEXT, b'{"op":"ping"}', rsv=rsv)
    expect_close_code(r, 1002)


@pytest.mark.parametrize("opcode", [0x3, 0x7, 0xB, 0xF])
def test_reserved_opcode_is_1002(relay, opcode):
    r = raw(relay)
    r.send_frame(opcode, b"x")
    expect_close_code(r, 1002)


@pytest.mark.parametrize("opcode", [PING, PONG], ids=["ping", "pong"])
def test_control_frame_over_125_bytes_is_1002(relay, opcode):
    r = raw(relay)
    r.send_frame(opcode, b"p" * 126)
    expect_close_code(r, 1002)


def test_fragmented_control_frame_is_1002(relay):
    r = raw(relay)
    r.send_frame(PING, b"abc", fin=False)
    expect_close_code(r, 1002)


def test_continuation_without_start_is_1002(relay):
    r = raw(relay)
    r.send_frame(CONT, b'{"op":"ping"}', fin=True)
    expect_close_code(r, 1002)


def test_new_message_inside_a_fragmented_one_is_1002(relay):
    r = raw(relay)
    # non-final fragments are at least 16 bytes (test_hostile_clients.py), so this one is 19
    r.send_frame(TEXT, b'{"op":"ping","pad":', fin=False)
    r.send_frame(TEXT, b'"xx"}', fin=True)
    expect_close_code(r, 1002)


# ---------------------------------------------------------------------------------------------
# 1003, 1007, 1009

def test_binary_message_is_1003(relay):
    r = raw(relay)
    r.send_frame(BINARY, b'{"op":"ping"}')
    expect_close_code(r, 1003)


def test_fragmented_binary_message_is_1003(relay):
    r = raw(relay)
    r.send_frame(BINARY, b'{"op":', fin=False)
    r.send_frame(CONT, b'"ping"}', fin=True)
    expect_close_code(r, 1003)


@pytest.mark.parametrize("payload", [
    b'{"op":"ping","x":"\xff"}',
    b'{"op":"ping","x":"\xc0\xaf"}',
    b'{"op":"ping","x":"\xed\xa0\x80"}',
    b'{"op":"ping"}\xe2\x82',
    b"\x80",
], ids=["ff", "overlong", "surrogate", "truncated-at-end", "lone-continuation"])
def test_invalid_utf8_text_is_1007(relay, payload):
    r = raw(relay)
    r.send_frame(TEXT, payload)
    expect_close_code(r, 1007)


def test_invalid_utf8_in_a_fragment_is_1007(relay):
    r = raw(relay)
    r.send_frame(TEXT, b'{"op":"ping","pad":"xx",', fin=False)
    r.send_frame(CONT, b'"x":"\xff"}', fin=True)
    expect_close_code(r, 1007)


@pytest.mark.parametrize("size", [65537, 100_000])
def test_message_over_64k_is_1009(relay, size):
    r = raw(relay)
    r.send_frame(TEXT, ping_json_of_size(size))
    expect_close_code(r, 1009)


def test_fragments_summing_over_64k_are_1009(relay):
    r = raw(relay)
    body = ping_json_of_size(80_000)
    r.send_frame(TEXT, body[:40_000], fin=False)
    r.send_frame(CONT, body[40_000:], fin=True)
    expect_close_code(r, 1009)


def test_many_small_fragments_summing_over_64k_are_1009(relay):
    r = raw(relay)
    body = ping_json_of_size(70_000)
    chunks = [body[i:i + 7000] for i in range(0, len(body), 7000)]
    r.send_frame(TEXT, chunks[0], fin=False)
    for c in chunks[1:-1]:
        r.send_frame(CONT, c, fin=False)
    try:
        r.send_frame(CONT, chunks[-1], fin=True)
    except OSError:
        pass   # the relay may already have closed
    expect_close_code(r, 1009)


def test_message_of_exactly_64k_is_accepted(relay):
    r = raw(relay)
    r.send_frame(TEXT, ping_json_of_size(65536))
    assert r.recv_json() == {"op": "pong", "type": "pong"}


def test_fragmented_message_of_exactly_64k_is_accepted(relay):
    r = raw(relay)
    body = ping_json_of_size(65536)
    r.send_frame(TEXT, body[:30_000], fin=False)
    r.send_frame(CONT, body[30_000:60_000], fin=False)
    r.send_frame(CONT, body[60_000:], fin=True)
    assert r.recv_json() == {"op": "pong", "type": "pong"}


# ---------------------------------------------------------------------------------------------
# valid framing the relay must accept

def test_fragmented_text_message_is_reassembled(relay):
    r = raw(relay)
    # non-final fragments are at least 16 bytes; the final one may be a single byte
    body = b'{"op":"ping","pad":"0123456789abcdef"}'
    r.send_frame(TEXT, body[:16], fin=False)
    r.send_frame(CONT, body[16:-1], fin=False)
    r.send_frame(CONT, body[-1:], fin=True)
    assert r.recv_json() == {"op": "pong", "type": "pong"}


def test_utf8_character_split_across_fragments_is_fine(relay):
    r = raw(relay)
    body = '{"op":"ping","x":"é✓"}'.encode()
    cut = body.index("é".encode()) + 1   # in the middle of é
    r.send_frame(TEXT, body[:cut], fin=False)
    r.send_frame(CONT, body[cut:], fin=True)
    assert r.recv_json() == {"op": "pong", "type": "pong"}


def test_control_frame_between_fragments(relay):
    r = raw(relay)
    r.send_frame(TEXT, b'{"op":"ping","pad":', fin=False)
    r.send_frame(PING, b"hb")
    r.send_frame(CONT, b'"xx"}', fin=True)
    got_pong_frame, got_json = False, None
    for _ in range(2):
        f = r.recv_frame(5)
        assert f is not None and not f.masked
        if f.opcode == PONG:
            assert f.payload == b"hb"
            got_pong_frame = True
        else:
            assert f.opcode == TEXT, f
            got_json = f.json()
    assert got_pong_frame and got_json == {"op": "pong", "type": "pong"}


def test_client_ping_frame_gets_pong_with_same_payload(relay):
    r = raw(relay)
    r.send_frame(PING, b"hello-123")
    f = r.recv_frame(5)
    assert f is not None and f.opcode == PONG and f.payload == b"hello-123"
    assert not f.masked


@pytest.mark.parametrize("payload", [struct.pack("!H", 1000) + b"bye", b""],
                         ids=["code-1000", "no-code"])
def test_client_close_is_answered_with_close(relay, payload):
    r = raw(relay)
    r.send_frame(CLOSE, payload)
    frames, code, how = r.read_until_close(5)
    assert how == "close", how
    # RFC 6455 7.4.1: 1005 and 1006 must never be put in a close frame
    assert code not in (1005, 1006)
    if payload:
        assert code == 1000
    _, _, how2 = r.read_until_close(3)
    assert how2 in ("eof", "reset")


def test_relay_frames_are_unmasked_text(relay):
    r = raw(relay, topics=["t"])
    sub = r.recv_data(5)
    assert sub.opcode == TEXT and not sub.masked and sub.fin
    assert sub.json()["op"] == "subscribed"
    assert relay.emit_lines([b'{"topic":"t","n":1}']) == []
    f = r.recv_data(5)
    assert f.opcode == TEXT and not f.masked
    assert f.payload == b'{"seq":1,"topic":"t","n":1}'


# ---------------------------------------------------------------------------------------------
# no extension is negotiated

def test_no_extension_negotiated_raw(relay):
    r = RawWS.for_relay(relay, headers={
        "Sec-WebSocket-Extensions":
            "permessage-deflate; client_max_window_bits, permessage-deflate",
    })
    assert r.status == 101
    assert "sec-websocket-extensions" not in r.headers, r.headers
    # and RSV1 (what a compressed message would carry) is still a protocol error
    r.send_frame(TEXT, b'{"op":"ping"}', rsv=4)
    expect_close_code(r, 1002)


@async_test
async def test_no_extension_negotiated_with_websockets_client(relay):
    ws = await ws_connect(relay, compression="deflate")
    assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
    await ws.send('{"op":"ping"}')
    assert json.loads(await ws.recv()) == {"op": "pong", "type": "pong"}
