"""Just enough DER to read an OpenSSL SSL_SESSION's id, times and session id context.

Receivers check that a NEW's DER carries the session id its envelope claims, and the cache front
reads the sid_ctx of sessions httpd hands it, without linking OpenSSL (workers run anywhere).
Layout (OpenSSL ssl/ssl_asn1.c, SSL_SESSION_ASN1): SEQUENCE { version INTEGER, ssl_version
INTEGER, cipher OCTET STRING, session_id OCTET STRING, master_key OCTET STRING,
[0] key_arg, [1] time INTEGER, [2] timeout INTEGER, [3] peer, [4] session_id_context, ... }.
"""

from __future__ import annotations

from typing import NamedTuple


class DerError(ValueError):
    pass


class SessionFields(NamedTuple):
    """A tuple, not a frozen dataclass: made on every session a cache front stores and every
    NEW a replica checks, and a frozen dataclass's __init__ costs more than the parse itself."""

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


_NEW_FIELDS = tuple.__new__
# version, ssl_version, cipher, session_id: the fields every SSL_SESSION starts with, in order
_EXPECTED = (0x02, 0x02, 0x04, 0x04)
_TIME, _TIMEOUT, _SID_CTX = 0xA1, 0xA2, 0xA4  # explicit [1], [2], [4]


def _long_length(buf: bytes, pos: int, first: int, end: int) -> tuple[int, int]:
    """(length, value start) of a long-form DER length whose first byte ``first`` is at pos-1."""
    n = first & 0x7F
    if n == 0 or n > 4 or pos + n > end:
        raise DerError("bad length")
    return int.from_bytes(buf[pos : pos + n], "big"), pos + n


def _int(buf: bytes, start: int, end: int) -> int:
    if start >= end or end - start > 9:
        raise DerError("bad integer")
    return int.from_bytes(buf[start:end], "big", signed=True)


def parse_session(der: bytes) -> SessionFields:
    """The fields above, from ``i2d_SSL_SESSION`` output; DerError for anything malformed.

    One loop with the TLV reads written out: this runs for every session a cache front stores
    and every NEW a replica applies (a helper call per element cost twice as much).
    """
    end = len(der)
    if end < 2 or der[0] != 0x30:
        raise DerError("not a SEQUENCE")
    length = der[1]
    pos = 2
    if length == 0x81:  # what a session of 128..255 bytes has: no call for it
        if end < 3:
            raise DerError("bad length")
        length = der[2]
        pos = 3
    elif length & 0x80:
        length, pos = _long_length(der, pos, length, end)
    if pos + length != end:
        raise DerError("truncated or trailing bytes")
    seen = 0
    ssl_version = 0
    session_id = b""
    time_: int | None = None
    timeout: int | None = None
    sid_ctx = b""
    while pos < end:
        if pos + 2 > end:
            raise DerError("truncated")
        tag = der[pos]
        length = der[pos + 1]
        pos += 2
        if length & 0x80:
            length, pos = _long_length(der, pos, length, end)
        stop = pos + length
        if stop > end:
            raise DerError("truncated")
        if seen < 4:
            if tag != _EXPECTED[seen]:
                raise DerError("unexpected field")
            if seen == 1:
                ssl_version = _int(der, pos, stop)
            elif seen == 3:
                session_id = der[pos:stop]
            seen += 1
        elif tag > _SID_CTX:
            break  # fields are in tag order: nothing after [4] is needed (saves ~1/3 the time)
        elif tag in (_TIME, _TIMEOUT, _SID_CTX):
            if pos + 2 > stop:
                raise DerError("truncated")
            inner = der[pos]
            ilen = der[pos + 1]
            istart = pos + 2
            if ilen & 0x80:
                ilen, istart = _long_length(der, istart, ilen, stop)
            istop = istart + ilen
            if istop > stop:
                raise DerError("truncated")
            if tag == _SID_CTX:
                if inner != 0x04:
                    raise DerError("bad sid_ctx")
                sid_ctx = der[istart:istop]
            elif inner != 0x02:
                raise DerError("bad time")
            elif tag == _TIME:
                time_ = _int(der, istart, istop)
            else:
                timeout = _int(der, istart, istop)
        pos = stop
    if seen < 4:
        raise DerError("truncated")
    return _NEW_FIELDS(SessionFields, (ssl_version, session_id, time_, timeout, sid_ctx))
