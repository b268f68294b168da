"""Just enough DER to read an OpenSSL SSL_SESSION's id, times and session id context.

Receivers check that a NEW's DER carries the session id its envelope claims, and the cache front
reads the sid_ctx of sessions httpd hands it, without linking OpenSSL (workers run anywhere).
Layout (OpenSSL ssl/ssl_asn1.c, SSL_SESSION_ASN1): SEQUENCE { version INTEGER, ssl_version
INTEGER, cipher OCTET STRING, session_id OCTET STRING, master_key OCTET STRING,
[0] key_arg, [1] time INTEGER, [2] timeout INTEGER, [3] peer, [4] session_id_context, ... }.
"""

from __future__ import annotations

from dataclasses import dataclass


class DerError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SessionFields:
    ssl_version: int  # 0x0303 TLS 1.2, 0x0304 TLS 1.3
    session_id: bytes
    time: int | None
    timeout: int | None
    sid_ctx: bytes

    @property
    def expires(self) -> float | None:
        if self.time is None or self.timeout is None:
            return None
        return float(self.time + self.timeout)


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Return (tag, value_start, value_end) of the element at ``pos``."""
    if pos + 2 > end:
        raise DerError("truncated")
    tag = buf[pos]
    length = buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > end:
            raise DerError("bad length")
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    if pos + length > end:
        raise DerError("truncated")
    return tag, pos, pos + length


def _int(buf: bytes, start: int, end: int) -> int:
    if start >= end or end - start > 9:
        raise DerError("bad integer")
    return int.from_bytes(buf[start:end], "big", signed=True)


def parse_session(der: bytes) -> SessionFields:
    tag, pos, end = _tlv(der, 0, len(der))
    if tag != 0x30 or end != len(der):
        raise DerError("not a SEQUENCE")
    expected = (0x02, 0x02, 0x04, 0x04)  # version, ssl_version, cipher, session_id
    session_id = b""
    ssl_version = 0
    for i, want in enumerate(expected):
        tag, start, stop = _tlv(der, pos, end)
        if tag != want:
            raise DerError("unexpected field")
        if i == 1:
            ssl_version = _int(der, start, stop)
        elif i == 3:
            session_id = der[start:stop]
        pos = stop
    time_: int | None = None
    timeout: int | None = None
    sid_ctx = b""
    while pos < end:
        tag, start, stop = _tlv(der, pos, end)
        pos = stop
        if tag > 0xA4:
            break  # fields are in tag order: nothing after [4] is needed (saves ~1/3 the time)
        if tag in (0xA1, 0xA2, 0xA4):  # explicit [1] time, [2] timeout, [4] sid_ctx
            inner, istart, istop = _tlv(der, start, stop)
            if tag == 0xA4:
                if inner != 0x04:
                    raise DerError("bad sid_ctx")
                sid_ctx = der[istart:istop]
            else:
                if inner != 0x02:
                    raise DerError("bad time")
                if tag == 0xA1:
                    time_ = _int(der, istart, istop)
                else:
                    timeout = _int(der, istart, istop)
    return SessionFields(
        ssl_version=ssl_version, session_id=session_id, time=time_, timeout=timeout,
        sid_ctx=sid_ctx,
    )
