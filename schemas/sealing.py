"""AEAD sealing by purpose, the key files, and the ring signing keys.

Keys by role.  A bus-key file line ``sbk1:<base64 32 bytes>`` is a *root* key; nothing is sealed
under it directly.  HKDF-SHA256 derives one key per purpose from it:

- ``session``: seals session events (NEW/GET/REMOVE). Nodes, cache fronts, workers, revoke.
- ``ring``: seals ticket-key rings. Everything that follows ticket keys, and the key publisher.

A ring-only file (``sbr1:<base64 of the ring key>`` lines, ``sessionbus bus-key ring-file``) is
what a keyfile host and the key publisher hold: it opens rings and cannot open (or seal) a session.

Nonces.  No random nonce under a farm-wide key: each process draws a random 16-byte *sender salt*
at start and seals under ``HKDF(purpose key, salt)``, with a 64-bit message counter as the nonce.
A (key, nonce) pair can repeat only if two processes draw the same 128-bit salt, and a process
would need 2^64 messages to wrap its counter.  The counter is also what receivers track for replay
protection (``schemas.freshness``).

A sealed body is ``format (1) | key id (4) | salt (16) | counter (8) | AES-256-GCM ct+tag``;
those 29 header bytes are part of the associated data, after them the caller's (schema version,
event type, origin, routing key).  Nothing of the body is parsed before its tag verifies.

Key files: one key per line; ``#`` comments and blank lines are ignored.  The first key of a kind
seals; every key opens, so a key rotates in three steps (add it second everywhere, move it first
everywhere, drop the old one), the ring-only file alongside.

Ring signing keys (Ed25519): ``sbsign1:<base64 seed>`` in a 0600 file held only by the key
publishers (leader and standby share it), ``sbpub1:<base64 public key>`` lines in a distributable
file every follower holds.  Several public keys may be listed (a signing-key rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sessionbus.schemas.errors import EnvelopeError, Reason

KEY_SIZE = 32
KEY_ID_SIZE = 4
SALT_SIZE = 16
COUNTER_SIZE = 8
TAG_SIZE = 16
FORMAT = 0x02  # format 1 (random nonces under the one bus key) is no longer accepted
HEADER_SIZE = 1 + KEY_ID_SIZE + SALT_SIZE + COUNTER_SIZE
SEAL_OVERHEAD = HEADER_SIZE + TAG_SIZE
SIGNER_ID_SIZE = 8
SIGNATURE_SIZE = 64
_PREFIX = "sbk1:"
_RING_PREFIX = "sbr1:"
_SIGN_PREFIX = "sbsign1:"
_PUB_PREFIX = "sbpub1:"
_MAX_SENDER_KEYS = 1024  # derived per-sender keys a receiver keeps (re-derived on a miss)

SESSION = b"session"
RING = b"ring"


class BusKeyError(ValueError):
    """A key file that cannot be used, or a key this process lacks. Never holds key bytes."""


def key_id_of(key: bytes) -> bytes:
    return hashlib.sha256(b"sessionbus bus key id\0" + key).digest()[:KEY_ID_SIZE]


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_SIZE, salt=None, info=info).derive(key)


def purpose_key(root: bytes, purpose: bytes) -> bytes:
    """The key of one purpose (``SESSION``, ``RING``) derived from a root bus key."""
    return _hkdf(root, b"sessionbus purpose v2\0" + purpose)


def signer_id_of(public: Ed25519PublicKey) -> bytes:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(b"sessionbus ring signer\0" + raw).digest()[:SIGNER_ID_SIZE]


@dataclass(frozen=True, slots=True)
class Opened:
    """An authenticated plaintext and who sealed it: the sender salt and its message counter."""

    plaintext: bytes
    salt: bytes
    counter: int


class _Purpose:
    """The keys of one purpose: the first seals (under this process's salt), all open."""

    __slots__ = ("_cache", "_counter", "_keys", "_lock", "_salt", "_seal_aead", "name",
                 "seal_id")

    def __init__(self, name: bytes, keys: list[bytes]) -> None:
        self.name = name
        self._keys: dict[bytes, bytes] = {}
        for k in keys:
            self._keys.setdefault(key_id_of(k), k)
        self.seal_id: bytes | None = key_id_of(keys[0]) if keys else None
        self._salt = os.urandom(SALT_SIZE)
        self._counter = 0
        self._lock = threading.Lock()  # sealing may happen off the loop (a worker thread)
        self._seal_aead = (
            AESGCM(self._subkey(keys[0], self._salt)) if keys else None
        )
        self._cache: dict[tuple[bytes, bytes], AESGCM] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def _subkey(self, key: bytes, salt: bytes) -> bytes:
        return _hkdf(key, b"sessionbus sender v2\0" + self.name + b"\0" + salt)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        if self._seal_aead is None or self.seal_id is None:
            raise BusKeyError(
                f"no {self.name.decode()} key held: this key file cannot seal "
                f"{self.name.decode()} messages"
            )
        with self._lock:
            self._counter += 1
            counter = self._counter
        header = bytes((FORMAT,)) + self.seal_id + self._salt + struct.pack(">Q", counter)
        nonce = b"\0\0\0\0" + header[-COUNTER_SIZE:]
        return header + self._seal_aead.encrypt(nonce, plaintext, header + aad)

    def open(self, body: bytes, aad: bytes) -> Opened:
        # Only fixed-offset slices of the header are looked at before the tag verifies.
        if len(body) < SEAL_OVERHEAD:
            raise EnvelopeError(Reason.TRUNCATED, "shorter than a sealed message")
        if body[0] != FORMAT:
            raise EnvelopeError(Reason.FORGED, "not a sealed message (format byte)")
        kid = body[1 : 1 + KEY_ID_SIZE]
        key = self._keys.get(kid)
        if key is None:
            if not self._keys:
                raise EnvelopeError(Reason.UNKNOWN_KEY, f"no {self.name.decode()} key held")
            raise EnvelopeError(Reason.UNKNOWN_KEY, f"key id {kid.hex()} not held")
        salt = body[1 + KEY_ID_SIZE : 1 + KEY_ID_SIZE + SALT_SIZE]
        header = body[:HEADER_SIZE]
        aead = self._cache.get((kid, salt))
        cached = aead is not None
        if aead is None:
            aead = AESGCM(self._subkey(key, salt))
        try:
            plain = aead.decrypt(b"\0\0\0\0" + header[-COUNTER_SIZE:], body[HEADER_SIZE:],
                                 header + aad)
        except InvalidTag:
            raise EnvelopeError(Reason.FORGED, "authentication failed") from None
        if not cached:  # only authenticated senders take a cache slot
            if len(self._cache) >= _MAX_SENDER_KEYS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(kid, salt)] = aead
        return Opened(plain, salt, struct.unpack(">Q", header[-COUNTER_SIZE:])[0])


class BusKeys:
    """What a process holds: session keys and/or ring keys, and the ring signing material.

    ``keys``: root bus keys (both purposes derive from them); ``ring_keys``: ring keys of a
    ring-only file.  ``signing_key``: the key publisher's; its public key is always one of the
    ``ring_signers`` a ring is verified against.  ``any_origin_users``: see ``codec``.
    """

    __slots__ = ("_ring", "_session", "_signers", "_signing", "any_origin_users")

    def __init__(
        self,
        keys: Iterable[bytes] = (),
        *,
        ring_keys: Iterable[bytes] = (),
        signing_key: Ed25519PrivateKey | None = None,
        ring_signers: Iterable[Ed25519PublicKey] = (),
        any_origin_users: Iterable[str] = (),
    ) -> None:
        # Receiving policy: broker users whose messages may carry any origin (the dev/test
        # allowance, see codec); everyone else speaks only for the origin named as its user.
        self.any_origin_users = frozenset(any_origin_users)
        roots = list(keys)
        extra_ring = list(ring_keys)
        for k in (*roots, *extra_ring):
            if len(k) != KEY_SIZE:
                raise BusKeyError(f"a bus key must be {KEY_SIZE} bytes")
        if not roots and not extra_ring:
            raise BusKeyError("no bus key")
        self._session = _Purpose(SESSION, [purpose_key(k, SESSION) for k in roots])
        self._ring = _Purpose(RING, [purpose_key(k, RING) for k in roots] + extra_ring)
        self._signing = signing_key
        self._signers: dict[bytes, Ed25519PublicKey] = {}
        pubs = list(ring_signers)
        if signing_key is not None:
            pubs.insert(0, signing_key.public_key())
        for pub in pubs:
            self._signers.setdefault(signer_id_of(pub), pub)

    def __repr__(self) -> str:
        sid = self._session.seal_id
        return (f"BusKeys(session={sid.hex() if sid else None}, sessions={len(self._session)}, "
                f"rings={len(self._ring)}, signers={len(self._signers)}, "
                f"signs={self._signing is not None})")

    @property
    def seal_key_id(self) -> bytes:
        """The id of the session key that seals (of the ring key for a ring-only holder)."""
        kid = self._session.seal_id or self._ring.seal_id
        assert kid is not None
        return kid

    @property
    def opens_sessions(self) -> bool:
        return len(self._session) > 0

    @property
    def can_sign_rings(self) -> bool:
        return self._signing is not None

    @property
    def verifies_rings(self) -> bool:
        """Whether any ring signer is trusted (without one, every ring is refused)."""
        return bool(self._signers)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Seal a session message (raises ``BusKeyError`` for a ring-only holder)."""
        return self._session.seal(plaintext, aad)

    def open(self, body: bytes, aad: bytes) -> bytes:
        return self._session.open(body, aad).plaintext

    def open_session(self, body: bytes, aad: bytes) -> Opened:
        return self._session.open(body, aad)

    def seal_ring(self, plaintext: bytes, aad: bytes) -> bytes:
        """Sign (Ed25519, over the associated data and the payload) and seal a key ring."""
        if self._signing is None:
            raise BusKeyError("no ring signing key held: only a key publisher signs rings")
        signer = signer_id_of(self._signing.public_key())
        sig = self._signing.sign(_signed(aad, plaintext))
        return self._ring.seal(signer + sig + plaintext, aad)

    def open_ring(self, body: bytes, aad: bytes) -> bytes:
        """Open a ring and check its signature, both before anything of it is parsed."""
        inner = self._ring.open(body, aad).plaintext
        if len(inner) < SIGNER_ID_SIZE + SIGNATURE_SIZE:
            raise EnvelopeError(Reason.SIGNATURE, "no signature")
        signer = inner[:SIGNER_ID_SIZE]
        sig = inner[SIGNER_ID_SIZE : SIGNER_ID_SIZE + SIGNATURE_SIZE]
        payload = inner[SIGNER_ID_SIZE + SIGNATURE_SIZE :]
        pub = self._signers.get(signer)
        if pub is None:
            raise EnvelopeError(Reason.SIGNATURE, f"signer {signer.hex()} not trusted")
        try:
            pub.verify(sig, _signed(aad, payload))
        except InvalidSignature:
            raise EnvelopeError(Reason.SIGNATURE, "bad ring signature") from None
        return payload

    def ring_only(self) -> list[bytes]:
        """The ring keys (in seal order) a ring-only file holds."""
        return list(self._ring._keys.values())


def _signed(aad: bytes, payload: bytes) -> bytes:
    return b"sessionbus ring signature v1\0" + struct.pack(">I", len(aad)) + aad + payload


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def format_key_file(keys: Iterable[bytes]) -> str:
    lines = ["# sessionbus bus keys: the first seals, all open. Keep this file mode 0600."]
    lines += [_PREFIX + base64.b64encode(k).decode() for k in keys]
    return "\n".join(lines) + "\n"


def format_ring_file(ring_keys: Iterable[bytes]) -> str:
    lines = ["# sessionbus ring keys (ring-only: opens ticket-key rings, no session). Mode 0600."]
    lines += [_RING_PREFIX + base64.b64encode(k).decode() for k in ring_keys]
    return "\n".join(lines) + "\n"


def _parse_lines(text: str, source: str, prefixes: tuple[str, ...], size: int,
                 what: str) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        prefix = next((p for p in prefixes if line.startswith(p)), None)
        if prefix is None:
            raise BusKeyError(f"{source}: line {n} is not a sessionbus {what}")
        try:
            key = base64.b64decode(line[len(prefix) :], validate=True)
        except (binascii.Error, ValueError):
            raise BusKeyError(f"{source}: line {n} is not valid base64") from None
        if len(key) != size:
            raise BusKeyError(f"{source}: line {n} holds {len(key)} bytes, not {size}")
        out.append((prefix, key))
    if not out:
        raise BusKeyError(f"{source}: holds no key")
    return out


def parse_key_file(text: str, source: str = "bus key file") -> list[bytes]:
    """The root keys of a bus-key file (ring-only lines are refused here)."""
    return [k for _, k in _parse_lines(text, source, (_PREFIX,), KEY_SIZE, "bus key")]


def parse_any_key_file(text: str, source: str = "bus key file") -> tuple[list[bytes], list[bytes]]:
    """(root keys, ring keys) of a bus-key or ring-only file."""
    lines = _parse_lines(text, source, (_PREFIX, _RING_PREFIX), KEY_SIZE, "bus key")
    return ([k for p, k in lines if p == _PREFIX], [k for p, k in lines if p == _RING_PREFIX])


def _read_secret(p: Path, what: str) -> str:
    try:
        st = p.stat()
        text = p.read_text(encoding="ascii")
    except FileNotFoundError:
        raise BusKeyError(f"{what} {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BusKeyError(f"{what} {p} cannot be read: {type(exc).__name__}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BusKeyError(f"{what} {p} is readable by others; chmod 600 it")
    return text


def load_public_keys(path: str | os.PathLike[str]) -> list[Ed25519PublicKey]:
    """The ring signers' public keys (not secret: any mode)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii")
    except FileNotFoundError:
        raise BusKeyError(f"ring public key file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BusKeyError(f"ring public key file {p} cannot be read: {type(exc).__name__}"
                          ) from None
    lines = _parse_lines(text, str(p), (_PUB_PREFIX,), 32, "ring public key")
    return [Ed25519PublicKey.from_public_bytes(k) for _, k in lines]


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    p = Path(path)
    text = _read_secret(p, "ring signing key file")
    lines = _parse_lines(text, str(p), (_SIGN_PREFIX,), 32, "ring signing key")
    if len(lines) != 1:
        raise BusKeyError(f"{p}: holds {len(lines)} signing keys, not 1")
    return Ed25519PrivateKey.from_private_bytes(lines[0][1])


def load_bus_keys(
    path: str | os.PathLike[str],
    *,
    public_key_file: str | os.PathLike[str] | None = None,
    signing_key_file: str | os.PathLike[str] | None = None,
    any_origin_users: Iterable[str] = (),
) -> BusKeys:
    p = Path(path)
    roots, rings = parse_any_key_file(_read_secret(p, "bus key file"), str(p))
    return BusKeys(
        roots, ring_keys=rings,
        signing_key=load_signing_key(signing_key_file) if signing_key_file else None,
        ring_signers=load_public_keys(public_key_file) if public_key_file else (),
        any_origin_users=any_origin_users,
    )


def _create(p: Path, text: str, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(p, flags, mode)
    except FileExistsError:
        raise BusKeyError(f"{p} exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise BusKeyError(f"cannot create {p}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(f.fileno(), mode)
        f.write(text)


def write_new_key_file(path: str | os.PathLike[str], *, force: bool = False) -> bytes:
    """Write a file holding one fresh key, mode 0600. Returns the key id (not secret)."""
    key = new_key()
    _create(Path(path), format_key_file([key]), 0o600, force)
    return key_id_of(purpose_key(key, SESSION))


def write_ring_file(
    bus_key_file: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False
) -> int:
    """Write the ring-only file of a bus-key file (same order: the first seals). Returns the
    number of keys."""
    keys = load_bus_keys(bus_key_file)
    ring = keys.ring_only()
    _create(Path(out), format_ring_file(ring), 0o600, force)
    return len(ring)


def write_signing_key_pair(
    signing_file: str | os.PathLike[str], public_file: str | os.PathLike[str],
    *, force: bool = False,
) -> bytes:
    """A new Ed25519 ring signing key (0600) and its public key file (0644, distributable).
    Returns the signer id (not secret)."""
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key()
    raw_pub = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    _create(Path(signing_file),
            "# sessionbus ring signing key (key publishers only). Keep this file mode 0600.\n"
            + _SIGN_PREFIX + base64.b64encode(seed).decode() + "\n", 0o600, force)
    _create(Path(public_file),
            "# sessionbus ring public keys: every follower holds this file (not secret).\n"
            + _PUB_PREFIX + base64.b64encode(raw_pub).decode() + "\n", 0o644, force)
    return signer_id_of(pub)


def public_key_line(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return _PUB_PREFIX + base64.b64encode(raw).decode()
