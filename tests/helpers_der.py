"""Hand-made OpenSSL SSL_SESSION DER, for tests that must not link OpenSSL.

The layout is OpenSSL's SSL_SESSION_ASN1 (ssl/ssl_asn1.c) cut to the fields every session has::

    SEQUENCE {
        version          INTEGER 1,
        ssl_version      INTEGER 0x0303,
        cipher           OCTET STRING (2 bytes),
        session_id       OCTET STRING,
        master_key       OCTET STRING (48 bytes),
        time         [1] EXPLICIT INTEGER,
        timeout      [2] EXPLICIT INTEGER,
        sid_ctx      [4] EXPLICIT OCTET STRING,
    }

``openssl sess_id -inform DER`` reads it (see test_codec), so it is what ``i2d_SSL_SESSION`` of a
TLS 1.2 session minus the optional fields looks like.
"""

from __future__ import annotations

import os

# TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, as OpenSSL stores it (the last two bytes of 0x0300C02F)
DEFAULT_CIPHER = b"\xc0\x2f"
MASTER_KEY_SIZE = 48


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + der_length(len(value)) + value


def der_integer(value: int) -> bytes:
    """Minimal two's-complement INTEGER."""
    size = max(1, (value.bit_length() + 8) // 8)  # room for the sign bit
    body = value.to_bytes(size, "big", signed=True)
    # DER: no redundant leading 0x00 / 0xff
    while len(body) > 1 and (
        (body[0] == 0x00 and body[1] < 0x80) or (body[0] == 0xFF and body[1] >= 0x80)
    ):
        body = body[1:]
    return tlv(0x02, body)


def octets(value: bytes) -> bytes:
    return tlv(0x04, value)


def explicit(n: int, inner: bytes) -> bytes:
    return tlv(0xA0 | n, inner)


def make_session_der(
    session_id: bytes,
    sid_ctx: bytes,
    time: int,
    timeout: int,
    *,
    cipher: bytes = DEFAULT_CIPHER,
    master_key: bytes | None = None,
) -> bytes:
    """A syntactically valid SSL_SESSION DER (see the module docstring)."""
    if master_key is None:
        master_key = os.urandom(MASTER_KEY_SIZE)
    fields = [
        der_integer(1),
        der_integer(0x0303),
        octets(cipher),
        octets(session_id),
        octets(master_key),
        explicit(1, der_integer(time)),
        explicit(2, der_integer(timeout)),
        explicit(4, octets(sid_ctx)),
    ]
    return tlv(0x30, b"".join(fields))
