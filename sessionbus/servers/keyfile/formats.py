"""Render the farm's ticket-key ring into the key files other TLS servers read.

Pure functions: :func:`render` turns a :class:`~sessionbus.schemas.ticket_keys.KeyRing` at time
``now`` into the bytes of each server's file(s); writing them (atomically) and telling the
server to reload is someone else's job (``atomic_files``, ``sessionbus keyfile``).

Layouts, as read from each server's own source:

========  ==========================================  ==============================================
format    source (function / struct)                  bytes per key
========  ==========================================  ==============================================
nginx     src/event/ngx_event_openssl.c               80: name[0:16] hmac[16:48] aes[48:80]
          ``ngx_ssl_session_ticket_keys``             (48: name, **aes** [16:32], hmac [32:48])
haproxy   include/haproxy/ssl_sock-t.h                80: name[0:16] **aes**[16:48] hmac[48:80]
          ``struct tls_sess_key_256``; file parsed    (base64, one key a line)
          in src/cfgparse-ssl.c ``bind_parse_tls_
          ticket_keys``; used in src/ssl_sock.c
          ``ssl_tlsext_ticket_key_cb``
ats       ``struct ssl_ticket_key_t`` (P_SSLCert-      48: name[0:16] hmac[16:32] aes[32:48],
          Lookup.h), ``ticket_block_create``           concatenated; AES-128, HMAC key 16 bytes
          (SSLCertLookup.cc), TLSSessionResumption-
          Support.cc ``_setSessionInformation``
envoy     source/common/tls/context_config_impl.cc     80: name[0:16] hmac[16:48] aes[48:80]
          ``getSessionTicketKey``; context_impl.cc     (one DataSource per key)
          ``sessionTicketProcess``
httpd     modules/ssl/ssl_engine_init.c               48: name[0:16] hmac[16:32] aes[32:48]
          ``ssl_init_ticket_key``
========  ==========================================  ==============================================

Our :class:`~sessionbus.schemas.ticket_keys.TicketKey` carries 32-byte HMAC and AES secrets.
The 48-byte formats (ATS, httpd) take the first 16 bytes of each; every server of one kind
derives them the same way, so those servers interoperate with each other (not with the 80-byte
ones, which use AES-256 and cannot open an AES-128 ticket anyway).

Which key encrypts:

* nginx, Envoy, ATS: the first key; every other key only decrypts (and nginx/ATS/Envoy renew the
  ticket under the first key).
* HAProxy: the file is read line by line into a ring of ``TLS_TICKETS_NO`` (3 in stock builds,
  include/haproxy/defaults.h) slots, line ``i`` landing in slot ``i % 3``; at least 3 lines are
  required; the **next-to-last** line encrypts, and only the last three lines survive.  So we
  write exactly three lines: newest decrypt-only key, current key, key announced ahead.
* httpd: one key only; it encrypts and is the only one that decrypts.

Unused positions (nginx/Envoy slots, HAProxy's first/last line) are *filler* keys that nobody
encrypts with.  They are derived (HMAC-SHA256) from the current key's secrets and their position,
not drawn at random, so rendering the same ring twice yields the same bytes: an unchanged ring
never changes a file and never costs a server reload.
"""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from sessionbus.schemas.ticket_keys import KeyRing, TicketKey

__all__ = [
    "ATS_FILE",
    "HAPROXY_FILE",
    "HAPROXY_TLS_TICKETS_NO",
    "HTTPD_FILE",
    "RELOAD_LATENCY",
    "KeyFileError",
    "KeyFileFormat",
    "RenderedKeys",
    "announce_ahead",
    "render",
    "slot_file_name",
]

HAPROXY_FILE = "tls-ticket-keys"
ATS_FILE = "ssl_ticket.key"
HTTPD_FILE = "ticket.key"
# HAProxy's compile-time ring size (include/haproxy/defaults.h: ``#define TLS_TICKETS_NO 3``).
HAPROXY_TLS_TICKETS_NO = 3
# The encrypting key and the one announced ahead: a rotation with no failed resumption.
MIN_SLOTS = 2

_SHORT = 16  # secret bytes a 48-byte entry keeps
_FILLER_LABEL = b"sessionbus keyfile filler v1"


class KeyFileError(ValueError):
    """The ring cannot become a safe key file set (one-line message, never key bytes)."""


class KeyFileFormat(StrEnum):
    NGINX = "nginx"
    HAPROXY = "haproxy"
    ATS = "ats"
    ENVOY = "envoy"
    HTTPD = "httpd"


# Seconds from a changed key file to the server encrypting with it, where it is known to be
# more than a moment. Traffic Server 9.2 applies `traffic_ctl config reload` on a periodic task:
# write-to-load took 0-8.5 s on Debian's 9.2.9, so ~10 s. A ring announcing keys less than this
# ahead lets peers encrypt under a key this server does not hold yet.
RELOAD_LATENCY: dict[KeyFileFormat, float] = {KeyFileFormat.ATS: 10.0}


def announce_ahead(ring: KeyRing) -> float | None:
    """How long before it encrypts the ring's newest key was announced (None: nothing to judge).

    A farm's very first key is announced as it begins (nothing encrypted before it): a
    one-key ring with no lead time says nothing about the publisher's --announce-ahead.
    """
    if not ring.keys:
        return None
    newest = max(ring.keys, key=lambda k: (k.published_at, k.encrypt_from))
    ahead = newest.encrypt_from - newest.published_at
    if len(ring.keys) == 1 and ahead <= 0:
        return None
    return max(ahead, 0.0)


@dataclass(frozen=True, slots=True)
class RenderedKeys:
    """File name (relative to the output path) → content, plus warnings (counts and ages only)."""

    files: dict[str, bytes]
    warnings: list[str]

    def __repr__(self) -> str:  # never the key bytes
        sizes = ", ".join(f"{name}: {len(data)} B" for name, data in self.files.items())
        return f"RenderedKeys(files={{{sizes}}}, warnings={self.warnings!r})"


def slot_file_name(index: int) -> str:
    """The nginx/Envoy file for slot ``index`` (slot 0 encrypts)."""
    return f"ticket.{index}.key"


class _Material(NamedTuple):
    name: bytes  # 16
    hmac_secret: bytes  # 32
    aes_secret: bytes  # 32


def _material(key: TicketKey) -> _Material:
    return _Material(key.name, key.hmac_secret, key.aes_secret)


def _filler(current: TicketKey, fmt: KeyFileFormat, position: int) -> _Material:
    """A key nobody encrypts with, fixed for (current key, format, position).

    HMAC-SHA256 keyed with the current key's secrets is a PRF: without those secrets the filler is
    unpredictable, and it reveals nothing about them.
    """
    seed = current.hmac_secret + current.aes_secret
    info = b"%s/%s/%d" % (_FILLER_LABEL, fmt.value.encode(), position)
    out = b""
    counter = 1
    while len(out) < 80:
        out += hmac.digest(seed, info + bytes([counter]), "sha256")
        counter += 1
    return _Material(out[0:16], out[16:48], out[48:80])


def _name_hmac_aes_80(m: _Material) -> bytes:  # nginx 80-byte, Envoy
    return m.name + m.hmac_secret + m.aes_secret


def _name_aes_hmac_80(m: _Material) -> bytes:  # HAProxy tls_sess_key_256
    return m.name + m.aes_secret + m.hmac_secret


def _name_hmac_aes_48(m: _Material) -> bytes:  # ATS ssl_ticket_key_t, httpd
    return m.name + m.hmac_secret[:_SHORT] + m.aes_secret[:_SHORT]


@dataclass(frozen=True, slots=True)
class _Plan:
    current: TicketKey
    ahead: list[TicketKey]  # soonest to encrypt first
    decrypt_only: list[TicketKey]  # newest first
    duplicate_names: int


def _plan(ring: KeyRing, now: float) -> _Plan:
    current = ring.current(now)
    if current is None:
        raise KeyFileError(
            "the key ring has no encrypting key at this time (empty, erased, or none has begun): "
            "refusing to write ticket key files without one"
        )
    seen = {current.name}
    others: list[TicketKey] = []
    duplicates = 0
    for k in ring.live(now):
        if k == current or k in others:
            continue  # the same key listed twice
        if k.name in seen:
            # Servers look keys up by name and take the first match: a second key under the same
            # name could never decrypt anything.
            duplicates += 1
            continue
        seen.add(k.name)
        others.append(k)
    ahead = sorted((k for k in others if k.encrypt_from > now), key=lambda k: k.encrypt_from)
    decrypt_only = sorted(
        (k for k in others if k.encrypt_from <= now), key=lambda k: k.encrypt_from, reverse=True
    )
    return _Plan(current, ahead, decrypt_only, duplicates)


def _common_warnings(fmt: KeyFileFormat, plan: _Plan, now: float) -> list[str]:
    warnings: list[str] = []
    if now >= plan.current.encrypt_until:
        late = now - plan.current.encrypt_until
        warnings.append(
            f"{fmt}: the encrypting key is {late:.0f} s past the end of its encrypt window and no "
            "newer key has begun: is the key publisher running?"
        )
    if plan.duplicate_names:
        warnings.append(
            f"{fmt}: {plan.duplicate_names} key(s) reuse the name of another key and were left out"
        )
    return warnings


def _dropped_warning(fmt: KeyFileFormat, capacity: int, old: int, ahead: int) -> list[str]:
    out: list[str] = []
    if old:
        out.append(
            f"{fmt}: {old} decrypt-only key(s) left out (room for {capacity} keys): tickets "
            "minted under them fall back to a full handshake"
        )
    if ahead:
        out.append(
            f"{fmt}: {ahead} key(s) announced ahead left out (room for {capacity} keys): they "
            "will be written once they are next to encrypt"
        )
    return out


def _render_slots(
    fmt: KeyFileFormat, plan: _Plan, slots: int
) -> tuple[dict[str, bytes], list[str]]:
    """nginx and Envoy: ``slots`` files of 80 bytes, slot 0 encrypts, then ahead, then old."""
    # What to keep when the ring is larger than the slots: the current key, then the next key to
    # encrypt (peers may start with it any moment), then decrypt-only keys newest first (tickets
    # under them are live now), then keys announced further ahead (a later render picks them up).
    priority = [plan.current, *plan.ahead[:1], *plan.decrypt_only, *plan.ahead[1:]]
    kept = {id(k) for k in priority[:slots]}
    ahead = [k for k in plan.ahead if id(k) in kept]
    old = [k for k in plan.decrypt_only if id(k) in kept]
    ordered = [_material(k) for k in (plan.current, *ahead, *old)]
    while len(ordered) < slots:
        ordered.append(_filler(plan.current, fmt, len(ordered)))
    files = {slot_file_name(i): _name_hmac_aes_80(m) for i, m in enumerate(ordered)}
    warnings = _dropped_warning(
        fmt, slots, len(plan.decrypt_only) - len(old), len(plan.ahead) - len(ahead)
    )
    return files, warnings


def _render_haproxy(plan: _Plan) -> tuple[dict[str, bytes], list[str]]:
    """Three base64 lines: newest decrypt-only, current (next-to-last: encrypts), ahead (last)."""
    fmt = KeyFileFormat.HAPROXY
    last = HAPROXY_TLS_TICKETS_NO - 1
    first = _material(plan.decrypt_only[0]) if plan.decrypt_only else _filler(plan.current, fmt, 0)
    final = _material(plan.ahead[0]) if plan.ahead else _filler(plan.current, fmt, last)
    lines = [first, _material(plan.current), final]
    content = b"".join(base64.b64encode(_name_aes_hmac_80(m)) + b"\n" for m in lines)
    warnings = _dropped_warning(
        fmt,
        HAPROXY_TLS_TICKETS_NO,
        max(len(plan.decrypt_only) - 1, 0),
        max(len(plan.ahead) - 1, 0),
    )
    return {HAPROXY_FILE: content}, warnings


def render(fmt: KeyFileFormat, ring: KeyRing, now: float, *, slots: int = 4) -> RenderedKeys:
    """Render ``ring`` as the file(s) server ``fmt`` reads, for time ``now``.

    ``slots`` is the fixed number of key files for nginx and Envoy (configure that many
    ``ssl_session_ticket_key`` lines / ``session_ticket_keys`` entries; it never changes from one
    render to the next).  HAProxy always gets ``HAPROXY_TLS_TICKETS_NO`` lines, ATS every live
    key, httpd one key.

    httpd's ``SSLSessionTicketKeyFile`` holds a single key, the encrypting one: after a rotation
    tickets minted under the previous key no longer decrypt and those clients fall back to a full
    handshake (and httpd needs a graceful restart to read the new key).

    Raises :class:`KeyFileError` when no key encrypts at ``now`` (an empty or erased ring): a file
    set without an encrypting key is never produced.  Erased keys are never rendered.
    """
    if slots < MIN_SLOTS:
        raise KeyFileError(f"slots must be at least {MIN_SLOTS} (the current and the next key)")
    fmt = KeyFileFormat(fmt)
    plan = _plan(ring, now)
    warnings = _common_warnings(fmt, plan, now)
    files: dict[str, bytes]
    if fmt in (KeyFileFormat.NGINX, KeyFileFormat.ENVOY):
        files, dropped = _render_slots(fmt, plan, slots)
        warnings += dropped
    elif fmt is KeyFileFormat.HAPROXY:
        files, dropped = _render_haproxy(plan)
        warnings += dropped
    elif fmt is KeyFileFormat.ATS:
        keys = (plan.current, *plan.ahead, *plan.decrypt_only)
        files = {ATS_FILE: b"".join(_name_hmac_aes_48(_material(k)) for k in keys)}
    else:
        files = {HTTPD_FILE: _name_hmac_aes_48(_material(plan.current))}
    return RenderedKeys(files=files, warnings=warnings)
