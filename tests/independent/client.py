#!/usr/bin/env python3
"""Independent securesrv client, written from docs/PROTOCOL.md alone.

Python 3.11 standard library only.

Usage:
  client.py --ca CA --cert CERT --key KEY --connect HOST:PORT [--server-id ID] call OP PAYLOAD
  client.py --ca CA --cert CERT --key KEY --connect HOST:PORT [--server-id ID] conformance

`call` prints the answer payload to stdout (exit 0) or `CODE: MESSAGE` to stderr (exit 1);
a transport / TLS / identity failure is reported on stderr with exit 5.
`conformance` prints one `PASS name` / `FAIL name: why` line per check; exit 1 if any fails.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import random
import socket
import ssl
import struct
import subprocess
import sys
import time

# ---------------------------------------------------------------------------------------------
# Protocol constants (PROTOCOL.md §1, §2, §3)
# ---------------------------------------------------------------------------------------------

ALPN = "securesrv/1"
DEFAULT_SERVER_ID = "spiffe://securesrv/dispatcher/main"
DEFAULT_CONNECT = "127.0.0.1:2222"
MAX_FRAME_BYTES = 1_048_576
MAX_DEPTH = 16
HANDSHAKE_TIMEOUT_S = 5.0
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


# ---------------------------------------------------------------------------------------------
# Minimal MessagePack (nil, bool, int, str, bin, array, map) — strict decoder
# ---------------------------------------------------------------------------------------------


class MsgpackError(ValueError):
    pass


class Raw:
    """Pre-encoded MessagePack bytes, inserted verbatim by `pack` (for crafted test input)."""

    def __init__(self, data: bytes):
        self.data = bytes(data)


def pack(obj) -> bytes:
    out = bytearray()
    _pack(obj, out)
    return bytes(out)


def _pack(obj, out: bytearray) -> None:
    if isinstance(obj, Raw):
        out += obj.data
    elif obj is None:
        out.append(0xC0)
    elif obj is True:
        out.append(0xC3)
    elif obj is False:
        out.append(0xC2)
    elif isinstance(obj, int):
        _pack_int(obj, out)
    elif isinstance(obj, str):
        b = obj.encode("utf-8")
        n = len(b)
        if n < 32:
            out.append(0xA0 | n)
        elif n < 2**8:
            out += bytes((0xD9, n))
        elif n < 2**16:
            out += b"\xda" + struct.pack(">H", n)
        elif n < 2**32:
            out += b"\xdb" + struct.pack(">I", n)
        else:
            raise MsgpackError("str too long")
        out += b
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        b = bytes(obj)
        n = len(b)
        if n < 2**8:
            out += bytes((0xC4, n))
        elif n < 2**16:
            out += b"\xc5" + struct.pack(">H", n)
        elif n < 2**32:
            out += b"\xc6" + struct.pack(">I", n)
        else:
            raise MsgpackError("bin too long")
        out += b
    elif isinstance(obj, (list, tuple)):
        n = len(obj)
        if n < 16:
            out.append(0x90 | n)
        elif n < 2**16:
            out += b"\xdc" + struct.pack(">H", n)
        else:
            out += b"\xdd" + struct.pack(">I", n)
        for item in obj:
            _pack(item, out)
    elif isinstance(obj, dict):
        n = len(obj)
        if n < 16:
            out.append(0x80 | n)
        elif n < 2**16:
            out += b"\xde" + struct.pack(">H", n)
        else:
            out += b"\xdf" + struct.pack(">I", n)
        for k, v in obj.items():  # insertion order is preserved
            _pack(k, out)
            _pack(v, out)
    else:
        raise MsgpackError(f"cannot encode {type(obj).__name__}")


def _pack_int(v: int, out: bytearray) -> None:
    if 0 <= v < 128:
        out.append(v)
    elif -32 <= v < 0:
        out.append(v & 0xFF)
    elif v >= 0:
        if v < 2**8:
            out += bytes((0xCC, v))
        elif v < 2**16:
            out += b"\xcd" + struct.pack(">H", v)
        elif v < 2**32:
            out += b"\xce" + struct.pack(">I", v)
        elif v <= U64_MAX:
            out += b"\xcf" + struct.pack(">Q", v)
        else:
            raise MsgpackError("int out of range")
    else:
        if v >= -(2**7):
            out += b"\xd0" + struct.pack(">b", v)
        elif v >= -(2**15):
            out += b"\xd1" + struct.pack(">h", v)
        elif v >= -(2**31):
            out += b"\xd2" + struct.pack(">i", v)
        elif v >= -(2**63):
            out += b"\xd3" + struct.pack(">q", v)
        else:
            raise MsgpackError("int out of range")


def unpack(data: bytes, max_depth: int = MAX_DEPTH):
    """Decode exactly one value; refuse trailing bytes, truncation, types outside the spec
    (float, ext), the never-used byte 0xc1, invalid UTF-8, non-hashable/duplicate map keys
    and nesting deeper than `max_depth` containers."""
    dec = _Decoder(bytes(data), max_depth)
    value = dec.value(0)
    if dec.pos != len(dec.buf):
        raise MsgpackError(f"{len(dec.buf) - dec.pos} trailing byte(s)")
    return value


class _Decoder:
    def __init__(self, buf: bytes, max_depth: int):
        self.buf = buf
        self.pos = 0
        self.max_depth = max_depth

    def take(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            raise MsgpackError("truncated value")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def u(self, fmt: str, n: int) -> int:
        return struct.unpack(fmt, self.take(n))[0]

    def value(self, depth: int):
        t = self.take(1)[0]
        if t <= 0x7F:
            return t
        if t >= 0xE0:
            return t - 0x100
        if 0x80 <= t <= 0x8F:
            return self.map(t & 0x0F, depth)
        if 0x90 <= t <= 0x9F:
            return self.array(t & 0x0F, depth)
        if 0xA0 <= t <= 0xBF:
            return self.str(t & 0x1F)
        if t == 0xC0:
            return None
        if t == 0xC2:
            return False
        if t == 0xC3:
            return True
        if t == 0xC4:
            return self.take(self.u(">B", 1))
        if t == 0xC5:
            return self.take(self.u(">H", 2))
        if t == 0xC6:
            return self.take(self.u(">I", 4))
        if t == 0xCC:
            return self.u(">B", 1)
        if t == 0xCD:
            return self.u(">H", 2)
        if t == 0xCE:
            return self.u(">I", 4)
        if t == 0xCF:
            return self.u(">Q", 8)
        if t == 0xD0:
            return self.u(">b", 1)
        if t == 0xD1:
            return self.u(">h", 2)
        if t == 0xD2:
            return self.u(">i", 4)
        if t == 0xD3:
            return self.u(">q", 8)
        if t == 0xD9:
            return self.str(self.u(">B", 1))
        if t == 0xDA:
            return self.str(self.u(">H", 2))
        if t == 0xDB:
            return self.str(self.u(">I", 4))
        if t == 0xDC:
            return self.array(self.u(">H", 2), depth)
        if t == 0xDD:
            return self.array(self.u(">I", 4), depth)
        if t == 0xDE:
            return self.map(self.u(">H", 2), depth)
        if t == 0xDF:
            return self.map(self.u(">I", 4), depth)
        if t == 0xC1:
            raise MsgpackError("reserved byte 0xc1")
        raise MsgpackError(f"type 0x{t:02x} (float/ext) not used by the protocol")

    def str(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            raise MsgpackError(f"invalid UTF-8 in str: {e}") from None

    def _enter(self, depth: int, n: int) -> int:
        if depth + 1 > self.max_depth:
            raise MsgpackError(f"nesting deeper than {self.max_depth}")
        # every element takes at least one byte: reject absurd counts before looping
        if n > len(self.buf) - self.pos:
            raise MsgpackError("truncated container")
        return depth + 1

    def array(self, n: int, depth: int) -> list:
        d = self._enter(depth, n)
        return [self.value(d) for _ in range(n)]

    def map(self, n: int, depth: int) -> dict:
        d = self._enter(depth, 2 * n)
        out = {}
        for _ in range(n):
            k = self.value(d)
            if isinstance(k, (list, dict)):
                raise MsgpackError("container used as map key")
            # bytes/str/int/bool/None are hashable; keep their type distinct in the key
            key = (type(k).__name__, k)
            if key in out:
                raise MsgpackError(f"duplicate map key {k!r}")
            out[key] = self.value(d)
        return {k[1]: v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Messages (§3)
# ---------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """The server sent something the protocol does not allow."""


def is_uint(v, maximum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= maximum


# kind -> {field: (required, checker)}
_SERVER_MESSAGES = {
    "reply": {
        "id": (True, lambda v: is_uint(v, U64_MAX)),
        "payload": (True, lambda v: isinstance(v, bytes)),
    },
    "error": {
        "id": (True, lambda v: is_uint(v, U64_MAX)),
        "code": (True, lambda v: isinstance(v, str)),
        "message": (True, lambda v: isinstance(v, str)),
    },
    "pong": {
        "nonce": (True, lambda v: isinstance(v, bytes)),
        "in_flight": (True, lambda v: is_uint(v, U32_MAX)),
        "workers_available": (False, lambda v: v is None or is_uint(v, U32_MAX)),
    },
}


def encode_message(kind: str, fields: dict) -> bytes:
    return pack({kind: fields})


def decode_message(body: bytes) -> tuple[str, dict]:
    """Strictly decode one server -> client message body."""
    try:
        v = unpack(body)
    except MsgpackError as e:
        raise ProtocolError(f"invalid MessagePack: {e}") from None
    if not isinstance(v, dict) or len(v) != 1:
        raise ProtocolError("message is not a map with exactly one entry")
    (kind, fields), = v.items()
    if not isinstance(kind, str):
        raise ProtocolError("message kind is not a str")
    spec = _SERVER_MESSAGES.get(kind)
    if spec is None:
        raise ProtocolError(f"unexpected message kind {kind!r}")
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise ProtocolError(f"{kind}: fields are not a map with str keys")
    for name in fields:
        if name not in spec:
            raise ProtocolError(f"{kind}: unknown field {name!r}")
    for name, (required, check) in spec.items():
        if name not in fields:
            if required:
                raise ProtocolError(f"{kind}: missing field {name!r}")
            continue
        if not check(fields[name]):
            raise ProtocolError(f"{kind}: field {name!r} has a wrong type/value: {fields[name]!r}")
    return kind, fields


def request_body(id_: int, op: str, payload: bytes, timeout_ms=None, omit_timeout=True) -> bytes:
    fields = {"id": id_, "op": op, "payload": bytes(payload)}
    if timeout_ms is not None or not omit_timeout:
        fields["timeout_ms"] = timeout_ms
    return encode_message("request", fields)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# ---------------------------------------------------------------------------------------------
# Transport (§1, §2)
# ---------------------------------------------------------------------------------------------


class IdentityError(Exception):
    """The server is not the endpoint we meant to talk to (ALPN or SPIFFE ID)."""


class ConnectionClosed(Exception):
    pass


def make_context(ca: str, cert: str, key: str, alpn=(ALPN,)) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity = URI SAN, checked by hand below
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(certfile=cert, keyfile=key)
    if alpn is not None:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def parse_hostport(s: str) -> tuple[str, int]:
    if s.startswith("["):
        host, _, port = s[1:].partition("]:")
    else:
        host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad HOST:PORT {s!r}")
    return host, int(port)


def uri_sans(peercert: dict) -> list[str]:
    return [v for (k, v) in peercert.get("subjectAltName", ()) if k == "URI"]


class Conn:
    def __init__(self, host, port, ca, cert, key, server_id=DEFAULT_SERVER_ID,
                 alpn=(ALPN,), check_identity=True, io_timeout=30.0):
        self.ctx = make_context(ca, cert, key, alpn)
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        raw = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S)
        try:
            raw.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                ipaddress.ip_address(host)
                sni = None
            except ValueError:
                sni = host
            self.sock = self.ctx.wrap_socket(raw, server_hostname=sni,
                                             suppress_ragged_eofs=False,
                                             do_handshake_on_connect=False)
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            self.sock.do_handshake()
        except BaseException:
            raw.close()
            raise
        self.sock.settimeout(io_timeout)
        self.rbuf = bytearray()
        self.peer_ids = uri_sans(self.sock.getpeercert() or {})
        self.alpn = self.sock.selected_alpn_protocol()
        if check_identity:
            try:
                if self.alpn != ALPN:
                    raise IdentityError(f"server negotiated ALPN {self.alpn!r}, not {ALPN!r}")
                if len(self.peer_ids) != 1:
                    raise IdentityError(
                        f"server certificate has {len(self.peer_ids)} URI SANs, expected exactly 1")
                if self.peer_ids[0] != server_id:
                    raise IdentityError(
                        f"server identity {self.peer_ids[0]!r} is not {server_id!r}")
            except IdentityError:
                self.abort()
                raise

    # -- writing
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_body(self, body: bytes) -> None:
        self.sock.sendall(frame(body))

    def send(self, kind: str, fields: dict) -> None:
        self.send_body(encode_message(kind, fields))

    # -- reading
    def _fill(self, n: int) -> bool:
        """Make rbuf hold >= n bytes; False on EOF (close_notify)."""
        while len(self.rbuf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.rbuf)))
            if not chunk:
                return False
            self.rbuf += chunk
        return True

    def recv_body(self, max_frame=MAX_FRAME_BYTES) -> bytes:
        """Next frame body. Raises ConnectionClosed on a clean close at a frame boundary."""
        if not self._fill(4):
            if self.rbuf:
                raise ProtocolError("connection closed inside a frame header")
            raise ConnectionClosed("server closed the connection (close_notify)")
        (length,) = struct.unpack(">I", self.rbuf[:4])
        if length < 1 or length > max_frame:
            raise ProtocolError(f"server frame length {length} outside 1..{max_frame}")
        if not self._fill(4 + length):
            raise ProtocolError("connection closed inside a frame body")
        body = bytes(self.rbuf[4 : 4 + length])
        del self.rbuf[: 4 + length]
        return body

    def recv(self) -> tuple[str, dict]:
        return decode_message(self.recv_body())

    def wait_closed(self) -> str:
        """After a connection-level error: expect EOF. Returns how it closed."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return "close_notify"
                # any further application data after id-0 error is a violation
                return "data after connection-level error"
        except ssl.SSLEOFError:
            return "eof without close_notify"
        except ConnectionResetError:
            return "reset"
        except (socket.timeout, TimeoutError):
            return "still open"

    def close(self) -> None:
        try:
            self.sock.settimeout(1.0)
            self.sock.unwrap()  # sends our close_notify
        except (OSError, ValueError):
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def call(conn: Conn, id_: int, op: str, payload: bytes, timeout_ms=None) -> tuple[str, dict]:
    conn.send_body(request_body(id_, op, payload, timeout_ms))
    while True:
        kind, f = conn.recv()
        if kind in ("reply", "error") and f["id"] in (id_, 0):
            return kind, f
        if kind == "pong":
            continue
        raise ProtocolError(f"unexpected {kind} for id {f.get('id')!r}")


# ---------------------------------------------------------------------------------------------
# Conformance suite
# ---------------------------------------------------------------------------------------------


class CheckFailed(Exception):
    pass


def expect(cond, why):
    if not cond:
        raise CheckFailed(why)


class Suite:
    def __init__(self, args):
        self.args = args
        self.host, self.port = parse_hostport(args.connect)
        self.results = []

    def conn(self, **kw) -> Conn:
        a = self.args
        kw.setdefault("server_id", a.server_id)
        return Conn(self.host, self.port, a.ca, a.cert, a.key, **kw)

    def run(self, name, fn):
        try:
            note = fn()
            line = f"PASS {name}" + (f" ({note})" if note else "")
            ok = True
        except CheckFailed as e:
            line, ok = f"FAIL {name}: {e}", False
        except Exception as e:  # noqa: BLE001 — any crash is a failed check
            line, ok = f"FAIL {name}: {type(e).__name__}: {e}", False
        print(line, flush=True)
        self.results.append(ok)

    # -- helpers
    def expect_reply(self, kind, f, id_, payload=None):
        if kind == "error":
            raise CheckFailed(f"error {f['code']}: {f['message']} (id {f['id']})")
        expect(kind == "reply", f"expected reply, got {kind}")
        expect(f["id"] == id_, f"reply id {f['id']} != {id_}")
        if payload is not None:
            expect(f["payload"] == payload,
                   f"payload mismatch ({len(f['payload'])} bytes vs {len(payload)} expected)")
        return f["payload"]

    def expect_conn_error(self, c: Conn, code: str):
        kind, f = c.recv()
        expect(kind == "error", f"expected error, got {kind} {f}")
        expect(f["id"] == 0, f"expected id 0, got id {f['id']} ({f['code']})")
        expect(f["code"] == code, f"expected code {code}, got {f['code']} ({f['message']})")
        how = c.wait_closed()
        expect(how == "close_notify", f"after the error the connection: {how}")
        return f"message: {f['message']!r}"

    # -- checks
    def example_encoding(self):
        doc_req = bytes.fromhex(
            "00000022" "81" "a7726571756573" "74" "83"
            "a26964" "01" "a26f70" "a46563686f" "a77061796c6f6164" "c4026869")
        mine = frame(request_body(1, "echo", b"hi"))
        expect(mine == doc_req, f"encoded {mine.hex()} != documented {doc_req.hex()}")
        doc_reply = bytes.fromhex("00000018" "81a57265706c79" "82a2696401" "a77061796c6f6164c4026869")
        (n,) = struct.unpack(">I", doc_reply[:4])
        expect(n == len(doc_reply) - 4 == 24, "documented reply length is inconsistent")
        kind, f = decode_message(doc_reply[4:])
        expect((kind, f) == ("reply", {"id": 1, "payload": b"hi"}), f"decoded {kind} {f}")
        expect(pack({"reply": {"id": 1, "payload": b"hi"}}) == doc_reply[4:], "reply re-encoding differs")

    def transport(self):
        with self.conn() as c:
            v = c.sock.version()
            expect(v == "TLSv1.3", f"TLS version {v}")
            expect(c.alpn == ALPN, f"ALPN {c.alpn!r}")
            expect(c.peer_ids == [DEFAULT_SERVER_ID] or c.peer_ids == [self.args.server_id],
                   f"URI SANs {c.peer_ids}")
            return f"{v}, ALPN {c.alpn}, {c.peer_ids[0]}"

    def echo_small(self):
        with self.conn() as c:
            self.expect_reply(*call(c, 1, "echo", b"hi"), 1, b"hi")

    def echo_empty(self):
        with self.conn() as c:
            self.expect_reply(*call(c, 2, "echo", b""), 2, b"")

    def echo_512k(self):
        data = os.urandom(512 * 1024)
        with self.conn() as c:
            self.expect_reply(*call(c, 3, "echo", data), 3, data)

    def sha256(self):
        data = os.urandom(4099)
        with self.conn() as c:
            got = self.expect_reply(*call(c, 4, "sha256", data), 4)
            expect(len(got) == 64, f"answer length {len(got)}")
            expect(all(ch in b"0123456789abcdef" for ch in got), f"not lowercase hex: {got!r}")
            expect(got == hashlib.sha256(data).hexdigest().encode(), "wrong digest")
            got = self.expect_reply(*call(c, 5, "sha256", b""), 5)
            expect(got == hashlib.sha256(b"").hexdigest().encode(), "wrong digest of empty payload")

    def sleep(self):
        with self.conn() as c:
            t0 = time.monotonic()
            got = self.expect_reply(*call(c, 6, "sleep", b"250"), 6)
            dt = time.monotonic() - t0
            expect(got == b"slept 250 ms", f"answer {got!r}")
            expect(dt >= 0.25, f"answered after {dt * 1000:.0f} ms < 250 ms")
            return f"{dt * 1000:.0f} ms"

    def sleep_bad_input(self):
        with self.conn() as c:
            kind, f = call(c, 7, "sleep", b"x")
            expect(kind == "error" and f["id"] == 7 and f["code"] == "bad_request",
                   f"got {kind} {f}")
            self.expect_reply(*call(c, 8, "echo", b"still open"), 8, b"still open")

    def request_timeout(self):
        with self.conn() as c:
            kind, f = call(c, 9, "sleep", b"1500", timeout_ms=200)
            expect(kind == "error" and f["id"] == 9 and f["code"] == "timeout", f"got {kind} {f}")
            # explicit nil timeout_ms is allowed ("nil|uint")
            c.send_body(request_body(10, "echo", b"n", None, omit_timeout=False))
            self.expect_reply(*c.recv(), 10, b"n")

    def any_int_format(self):
        # "uint = any MessagePack integer format": id 5 as uint64, timeout as uint32
        with self.conn() as c:
            body = encode_message("request", {
                "id": Raw(b"\xcf" + struct.pack(">Q", 5)), "op": "echo",
                "payload": b"w", "timeout_ms": Raw(b"\xce" + struct.pack(">I", 5000))})
            c.send_body(body)
            self.expect_reply(*c.recv(), 5, b"w")

    def field_order(self):
        with self.conn() as c:
            c.send("request", {"payload": b"o", "op": "echo", "id": 11})
            self.expect_reply(*c.recv(), 11, b"o")

    def pipelining(self):
        rng = random.Random(0x5EC0)
        special = [1, 127, 128, 255, 256, 65535, 65536, U32_MAX, U32_MAX + 1, 2**63, U64_MAX]
        ids = list(special)
        seen = set(ids)
        while len(ids) < 200:
            i = rng.choice([rng.randrange(1, 256), rng.randrange(1, 2**32), rng.randrange(1, 2**64)])
            if i not in seen:
                seen.add(i)
                ids.append(i)
        rng.shuffle(ids)
        sleeps = {0: 900, 1: 600, 2: 300, 50: 450, 100: 150, 150: 50, 199: 10}
        expected, reqs = {}, bytearray()
        for n, i in enumerate(ids):
            if n in sleeps:
                op, payload = "sleep", str(sleeps[n]).encode()
                exp = f"slept {sleeps[n]} ms".encode()
            elif n % 3 == 0:
                op, payload = "sha256", os.urandom(rng.randrange(0, 300))
                exp = hashlib.sha256(payload).hexdigest().encode()
            else:
                op, payload = "echo", os.urandom(rng.randrange(0, 2000))
                exp = payload
            expected[i] = (n, op, exp)
            reqs += frame(request_body(i, op, payload))
        with self.conn() as c:
            c.send_raw(bytes(reqs))  # everything before reading any answer
            order = []
            while len(order) < len(ids):
                kind, f = c.recv()
                if kind == "error":
                    raise CheckFailed(f"error for id {f['id']}: {f['code']} {f['message']}")
                expect(kind == "reply", f"unexpected {kind}")
                i = f["id"]
                expect(i in expected, f"answer with unknown id {i}")
                expect(i not in order, f"second answer for id {i}")
                n, op, exp = expected[i]
                expect(f["payload"] == exp, f"wrong answer for id {i} (#{n} {op})")
                order.append(i)
        pos = [expected[i][0] for i in order]
        expect(pos != sorted(pos), "answers came back in request order (expected completion order)")
        expect(pos.index(0) > pos.index(199), "sleep 900 (sent first) answered before sleep 10 (sent last)")
        sleep_order = [sleeps[p] for p in pos if p in sleeps]
        expect(sleep_order == sorted(sleep_order), f"sleeps completed in order {sleep_order}")
        return f"200 answers, first answer was request #{pos[0]}, sleep 900 answered at #{pos.index(0) + 1}"

    def unknown_op(self):
        with self.conn() as c:
            kind, f = call(c, 12, "no-such-op", b"x")
            expect(kind == "error", f"got {kind}")
            expect(f["id"] == 12, f"error id {f['id']}")
            expect(f["code"] == "unknown_op", f"code {f['code']} ({f['message']})")
            self.expect_reply(*call(c, 13, "echo", b"after"), 13, b"after")

    def ping(self):
        nonce = os.urandom(32)
        with self.conn() as c:
            c.send("ping", {"nonce": nonce})
            kind, f = c.recv()
            expect(kind == "pong", f"got {kind} {f}")
            expect(f["nonce"] == nonce, "nonce not echoed unchanged")
            expect(is_uint(f["in_flight"], U32_MAX), "in_flight not a u32")
            wa = f.get("workers_available")
            expect(is_uint(wa, U32_MAX), f"dispatcher pong without workers_available: {wa!r}")
            return f"in_flight={f['in_flight']} workers_available={wa}"

    def ping_bad_nonce(self):
        with self.conn() as c:
            c.send("ping", {"nonce": os.urandom(8)})
            return self.expect_conn_error(c, "bad_request")

    def too_large(self):
        with self.conn() as c:
            c.send_raw(struct.pack(">I", MAX_FRAME_BYTES + 1))  # header only, no body
            return self.expect_conn_error(c, "too_large")

    def unknown_field(self):
        with self.conn() as c:
            c.send("request", {"id": 14, "op": "echo", "payload": b"x", "colour": "blue"})
            return self.expect_conn_error(c, "bad_request")

    def unknown_kind(self):
        with self.conn() as c:
            c.send("hello", {"id": 15})
            return self.expect_conn_error(c, "bad_request")

    def empty_frame(self):
        with self.conn() as c:
            c.send_raw(b"\x00\x00\x00\x00")
            return self.expect_conn_error(c, "bad_request")

    def trailing_bytes(self):
        with self.conn() as c:
            c.send_body(request_body(16, "echo", b"x") + b"\xc0")
            return self.expect_conn_error(c, "bad_request")

    def _wrong_type(self, fields):
        with self.conn() as c:
            c.send("request", fields)
            kind, f = c.recv()
            expect(kind == "error" and f["code"] == "bad_request",
                   f"expected bad_request, got {kind} {f}")
            return f"id {f['id']}" + (", connection closed" if f["id"] == 0 else "")

    def payload_as_str(self):  # §3.1 payload is `bin`; §4 "wrong field types" -> bad_request
        return self._wrong_type({"id": 17, "op": "echo", "payload": "text"})

    def op_as_bin(self):  # §3.1 op is `str`
        return self._wrong_type({"id": 20, "op": b"echo", "payload": b"x"})

    def id_zero(self):  # §3.1 id 0 is reserved
        return self._wrong_type({"id": 0, "op": "echo", "payload": b"x"})

    def negative_id(self):  # §3 uint = non-negative
        return self._wrong_type({"id": -1, "op": "echo", "payload": b"x"})

    def timeout_over_u32(self):  # §3.1 timeout_ms is u32
        return self._wrong_type({"id": 21, "op": "echo", "payload": b"x", "timeout_ms": 2**32})

    def forward_refused(self):
        with self.conn() as c:  # a message kind the dispatcher does not take from clients
            c.send("reply", {"id": 18, "payload": b"x"})
            return self.expect_conn_error(c, "bad_request")

    def identity_mismatch(self):
        other = "spiffe://securesrv/dispatcher/other"
        try:
            c = self.conn(server_id=other)
        except IdentityError as e:
            msg = str(e)
        else:
            c.abort()
            raise CheckFailed("client accepted a server that is not " + other)
        # the same through the CLI
        a = self.args
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--ca", a.ca, "--cert", a.cert,
                            "--key", a.key, "--connect", a.connect, "--server-id", other,
                            "call", "echo", "hi"], capture_output=True, timeout=30)
        expect(p.returncode != 0, "CLI exited 0 against the wrong server identity")
        expect(p.stdout == b"", f"CLI printed an answer: {p.stdout!r}")
        return msg

    def alpn_other_refused(self):
        try:
            c = self.conn(alpn=("http/1.1",), check_identity=False)
        except ssl.SSLError as e:
            norm = str(e).upper().replace(" ", "_")
            expect("NO_APPLICATION_PROTOCOL" in norm, f"handshake failed differently: {e}")
            return "no_application_protocol alert"
        c.abort()
        raise CheckFailed("handshake succeeded offering only http/1.1")

    def alpn_none_closed(self):
        c = self.conn(alpn=None, check_identity=False)
        try:
            expect(c.alpn is None, f"server selected {c.alpn!r} though none offered")
            try:
                c.send_body(request_body(19, "echo", b"x"))
            except OSError:
                return "closed (write failed)"
            try:
                body = c.recv_body()
            except (ConnectionClosed, ssl.SSLError, ConnectionResetError, ProtocolError) as e:
                return f"closed ({type(e).__name__})"
            kind, f = decode_message(body)
            expect(not (kind == "reply"), "server answered a request on a connection without ALPN")
            return f"got {kind} {f} then closed: {c.wait_closed()}"
        finally:
            c.abort()

    def in_flight_limit(self):
        n = 300
        reqs = b"".join(frame(request_body(1000 + k, "sleep", b"1500")) for k in range(n))
        with self.conn() as c:
            c.send_raw(reqs)
            codes = {}
            for _ in range(n):
                kind, f = c.recv()
                key = "reply" if kind == "reply" else f["code"]
                codes[key] = codes.get(key, 0) + 1
            expect(codes.get("overloaded", 0) >= n - 256, f"answers: {codes}")
            expect(codes.get("reply", 0) + codes.get("timeout", 0) >= 1, f"answers: {codes}")
            return str(codes)

    def all(self):
        checks = [
            ("example_encoding_s7", self.example_encoding),
            ("transport_tls13_alpn_identity", self.transport),
            ("echo_round_trip", self.echo_small),
            ("echo_empty_payload", self.echo_empty),
            ("echo_512KiB", self.echo_512k),
            ("sha256_answer_format", self.sha256),
            ("sleep", self.sleep),
            ("sleep_bad_input_is_request_error", self.sleep_bad_input),
            ("request_timeout_ms", self.request_timeout),
            ("uint_any_int_format", self.any_int_format),
            ("field_order_irrelevant", self.field_order),
            ("pipelining_200_out_of_order", self.pipelining),
            ("unknown_op", self.unknown_op),
            ("ping_pong", self.ping),
            ("ping_bad_nonce_length", self.ping_bad_nonce),
            ("frame_too_large", self.too_large),
            ("unknown_field", self.unknown_field),
            ("unknown_kind", self.unknown_kind),
            ("empty_frame", self.empty_frame),
            ("trailing_bytes", self.trailing_bytes),
            ("negative_id", self.negative_id),
            ("timeout_ms_over_u32", self.timeout_over_u32),
            ("client_sends_reply_kind", self.forward_refused),
            ("in_flight_limit_256", self.in_flight_limit),
            ("alpn_other_protocol_refused", self.alpn_other_refused),
            ("alpn_none_closed", self.alpn_none_closed),
            ("server_identity_mismatch_refused", self.identity_mismatch),
            ("payload_as_str_refused", self.payload_as_str),
            ("op_as_bin_refused", self.op_as_bin),
            ("request_id_0_refused", self.id_zero),
        ]
        for name, fn in checks:
            self.run(name, fn)
        failed = self.results.count(False)
        print(f"{len(self.results) - failed}/{len(self.results)} checks passed", file=sys.stderr)
        return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Independent securesrv client (PROTOCOL.md v1)")
    ap.add_argument("--ca", default="certs/ca.crt")
    ap.add_argument("--cert", default="certs/client.crt")
    ap.add_argument("--key", default="certs/client.key")
    ap.add_argument("--connect", default=DEFAULT_CONNECT, metavar="HOST:PORT")
    ap.add_argument("--server-id", default=DEFAULT_SERVER_ID, metavar="SPIFFE_ID")
    ap.add_argument("--timeout-ms", type=int, default=None, help="request deadline (u32)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("call", help="send one request")
    c.add_argument("op")
    c.add_argument("payload", help="payload as UTF-8 text ('-' = stdin bytes)")
    sub.add_parser("conformance", help="run the conformance suite")
    args = ap.parse_args(argv)

    if args.cmd == "conformance":
        return Suite(args).all()

    payload = sys.stdin.buffer.read() if args.payload == "-" else args.payload.encode("utf-8")
    try:
        host, port = parse_hostport(args.connect)
        with Conn(host, port, args.ca, args.cert, args.key, server_id=args.server_id) as conn:
            kind, f = call(conn, 1, args.op, payload, args.timeout_ms)
    except IdentityError as e:
        print(f"refusing to talk to the server: {e}", file=sys.stderr)
        return 5
    except (OSError, ssl.SSLError, ProtocolError, ConnectionClosed, ValueError) as e:
        print(f"connection failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 5
    if kind == "reply":
        sys.stdout.buffer.write(f["payload"])
        sys.stdout.buffer.flush()
        return 0
    scope = " (connection-level)" if f["id"] == 0 else ""
    print(f"{f['code']}{scope}: {f['message']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
