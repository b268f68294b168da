"""AEAD sealing under the cluster bus key, and the bus-key file.

A sealed body is ``key_id (4) | nonce (12) | AES-256-GCM ciphertext+tag``.  The clear header fields
(schema version, event type, origin: carried as AMQP headers so brokers and filters can see them)
are the associated data, so changing any of them breaks the tag.  The key id is not in the
associated data: it only selects a key, and keeping it out lets a damaged key id be told apart from
a key this process does not hold (see ``BusKeys.open``).

Bus-key file: one key per line, ``sbk1:<base64 of 32 bytes>``; ``#`` comments and blank lines are
ignored.  The first key seals; every key opens, so a key can rotate in three steps (add it second
everywhere, move it first everywhere, drop the old one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sessionbus.schemas.errors import EnvelopeError, Reason

KEY_SIZE = 32
KEY_ID_SIZE = 4
NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_OVERHEAD = KEY_ID_SIZE + NONCE_SIZE + TAG_SIZE
_PREFIX = "sbk1:"


class BusKeyError(ValueError):
    """A bus-key file that cannot be used. The message names the file, never key bytes."""


def key_id_of(key: bytes) -> bytes:
    return hashlib.sha256(b"sessionbus bus key id\0" + key).digest()[:KEY_ID_SIZE]


class BusKeys:
    """The bus keys a process holds: the first seals, all open."""

    __slots__ = ("_aeads", "_seal_id")

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._aeads: dict[bytes, AESGCM] = {}
        seal_id: bytes | None = None
        for key in keys:
            if len(key) != KEY_SIZE:
                raise BusKeyError(f"a bus key must be {KEY_SIZE} bytes")
            kid = key_id_of(key)
            self._aeads.setdefault(kid, AESGCM(key))
            seal_id = seal_id or kid
        if seal_id is None:
            raise BusKeyError("no bus key")
        self._seal_id = seal_id

    def __repr__(self) -> str:
        return f"BusKeys(seal={self._seal_id.hex()}, keys={len(self._aeads)})"

    @property
    def seal_key_id(self) -> bytes:
        return self._seal_id

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return self._seal_id + nonce + self._aeads[self._seal_id].encrypt(nonce, plaintext, aad)

    def open(self, body: bytes, aad: bytes) -> bytes:
        if len(body) < SEAL_OVERHEAD:
            raise EnvelopeError(Reason.TRUNCATED, "shorter than a sealed message")
        kid = body[:KEY_ID_SIZE]
        nonce = body[KEY_ID_SIZE : KEY_ID_SIZE + NONCE_SIZE]
        ct = body[KEY_ID_SIZE + NONCE_SIZE :]
        aead = self._aeads.get(kid)
        if aead is not None:
            try:
                return aead.decrypt(nonce, ct, aad)
            except InvalidTag:
                raise EnvelopeError(Reason.FORGED, "authentication failed") from None
        # An id we do not hold: either a key we lack, or a damaged id on a message one of our
        # keys sealed. Trying our few keys tells which (the id is not in the associated data).
        for aead in self._aeads.values():
            try:
                aead.decrypt(nonce, ct, aad)
            except InvalidTag:
                continue
            raise EnvelopeError(Reason.FORGED, "key id altered")
        raise EnvelopeError(Reason.UNKNOWN_KEY, f"bus key id {kid.hex()} not held")


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def format_key_file(keys: Iterable[bytes]) -> str:
    lines = ["# sessionbus bus keys: the first seals, all open. Keep this file mode 0600."]
    lines += [_PREFIX + base64.b64encode(k).decode() for k in keys]
    return "\n".join(lines) + "\n"


def parse_key_file(text: str, source: str = "bus key file") -> list[bytes]:
    keys: list[bytes] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith(_PREFIX):
            raise BusKeyError(f"{source}: line {n} is not a sessionbus bus key")
        try:
            key = base64.b64decode(line[len(_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise BusKeyError(f"{source}: line {n} is not valid base64") from None
        if len(key) != KEY_SIZE:
            raise BusKeyError(f"{source}: line {n} holds {len(key)} bytes, not {KEY_SIZE}")
        keys.append(key)
    if not keys:
        raise BusKeyError(f"{source}: holds no key")
    return keys


def load_bus_keys(path: str | os.PathLike[str]) -> BusKeys:
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text(encoding="ascii")
    except FileNotFoundError:
        raise BusKeyError(f"bus key file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BusKeyError(f"bus key file {p} cannot be read: {type(exc).__name__}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BusKeyError(f"bus key file {p} is readable by others; chmod 600 it")
    return BusKeys(parse_key_file(text, str(p)))


def write_new_key_file(path: str | os.PathLike[str], *, force: bool = False) -> bytes:
    """Write a file holding one fresh key, mode 0600. Returns the key id (not secret)."""
    p = Path(path)
    key = new_key()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise BusKeyError(f"{p} exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise BusKeyError(f"cannot create {p}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(format_key_file([key]))
    return key_id_of(key)
