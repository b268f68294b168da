"""Key files for nginx, HAProxy, Traffic Server, Envoy and httpd: bytes, order, atomic writes."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from sessionbus.schemas.ticket_keys import KeyRing, KeyState, TicketKey
from sessionbus.servers.keyfile.atomic_files import (
    UnsafeDirectoryError,
    check_private_dir,
    write_atomic,
)
from sessionbus.servers.keyfile.formats import (
    ATS_FILE,
    HAPROXY_FILE,
    HTTPD_FILE,
    KeyFileError,
    KeyFileFormat,
    RenderedKeys,
    render,
    slot_file_name,
)

NOW = 1_700_000_000.0


def make_key(tag: int, encrypt_from: float, encrypt_until: float, erase_at: float) -> TicketKey:
    """Distinct, recognisable bytes: the halves of each secret differ so truncation shows."""
    return TicketKey(
        name=bytes([tag]) * 16,
        hmac_secret=bytes([0x40 + tag]) * 16 + bytes([0x60 + tag]) * 16,
        aes_secret=bytes([0x80 + tag]) * 16 + bytes([0xA0 + tag]) * 16,
        published_at=encrypt_from - 600,
        encrypt_from=encrypt_from,
        encrypt_until=encrypt_until,
        erase_at=erase_at,
    )


ERASED = make_key(1, NOW - 4000, NOW - 3000, NOW - 100)
OLD2 = make_key(2, NOW - 3000, NOW - 2000, NOW + 1000)
OLD1 = make_key(3, NOW - 2000, NOW - 1000, NOW + 2000)
CURRENT = make_key(4, NOW - 1000, NOW + 1000, NOW + 3000)
AHEAD = make_key(5, NOW + 1000, NOW + 2000, NOW + 4000)
ALL = (ERASED, OLD2, OLD1, CURRENT, AHEAD)


def ring(*keys: TicketKey, seq: int = 7) -> KeyRing:
    return KeyRing(seq=seq, issued_at=NOW - 5, keys=keys)


FULL = ring(OLD2, AHEAD, ERASED, CURRENT, OLD1)  # shuffled on purpose


def test_fixture_states() -> None:
    assert [k.state(NOW) for k in ALL] == [
        KeyState.ERASED,
        KeyState.OLD,
        KeyState.OLD,
        KeyState.CURRENT,
        KeyState.AHEAD,
    ]
    assert FULL.current(NOW) is CURRENT


def nginx_fields(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """ngx_event_openssl.c, 80-byte key: name[0:16], hmac[16:48], aes[48:80]."""
    assert len(blob) == 80
    return blob[0:16], blob[16:48], blob[48:80]


def haproxy_fields(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """ssl_sock-t.h struct tls_sess_key_256: name, aes_key[32], hmac_key[32]."""
    assert len(blob) == 80
    return blob[0:16], blob[48:80], blob[16:48]  # returned as (name, hmac, aes)


def short_fields(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """ATS ssl_ticket_key_t / httpd: name[0:16], hmac[16:32], aes[32:48]."""
    assert len(blob) == 48
    return blob[0:16], blob[16:32], blob[32:48]


def full(k: TicketKey) -> tuple[bytes, bytes, bytes]:
    return k.name, k.hmac_secret, k.aes_secret


def short(k: TicketKey) -> tuple[bytes, bytes, bytes]:
    return k.name, k.hmac_secret[:16], k.aes_secret[:16]


# ---------------------------------------------------------------- nginx / Envoy (80-byte slots)


@pytest.mark.parametrize("fmt", [KeyFileFormat.NGINX, KeyFileFormat.ENVOY])
def test_slots_order_and_layout(fmt: KeyFileFormat) -> None:
    out = render(fmt, FULL, NOW)
    assert list(out.files) == [slot_file_name(i) for i in range(4)]
    assert [len(b) for b in out.files.values()] == [80] * 4
    got = [nginx_fields(out.files[slot_file_name(i)]) for i in range(4)]
    # slot 0 encrypts, then the key announced ahead, then decrypt-only newest first
    assert got == [full(CURRENT), full(AHEAD), full(OLD1), full(OLD2)]
    assert out.warnings == []


@pytest.mark.parametrize("fmt", [KeyFileFormat.NGINX, KeyFileFormat.ENVOY])
def test_slots_filler(fmt: KeyFileFormat) -> None:
    out = render(fmt, ring(CURRENT), NOW, slots=3)
    assert list(out.files) == [slot_file_name(i) for i in range(3)]
    assert nginx_fields(out.files["ticket.0.key"]) == full(CURRENT)
    live_names = {k.name for k in ALL}
    fillers = [out.files["ticket.1.key"], out.files["ticket.2.key"]]
    assert all(len(f) == 80 for f in fillers)
    assert fillers[0] != fillers[1]
    assert not {nginx_fields(f)[0] for f in fillers} & live_names
    for f in fillers:  # no secret of the current key leaks into a filler
        assert CURRENT.hmac_secret not in f and CURRENT.aes_secret not in f
    # deterministic: a re-render of the same keys (even a re-issued ring) is byte-identical
    assert render(fmt, ring(CURRENT, seq=99), NOW + 5, slots=3).files == out.files
    # and it follows the current key
    other = make_key(9, NOW - 1000, NOW + 1000, NOW + 3000)
    again = render(fmt, ring(other), NOW, slots=3).files
    assert again["ticket.1.key"] != out.files["ticket.1.key"]


def test_file_count_never_changes() -> None:
    for r in (ring(CURRENT), ring(CURRENT, AHEAD), FULL):
        assert len(render(KeyFileFormat.NGINX, r, NOW).files) == 4


def test_overflow_drops_oldest_decrypt_only_with_warning() -> None:
    out = render(KeyFileFormat.NGINX, FULL, NOW, slots=3)
    got = [nginx_fields(out.files[slot_file_name(i)]) for i in range(3)]
    assert got == [full(CURRENT), full(AHEAD), full(OLD1)]
    assert len(out.warnings) == 1
    assert "1 decrypt-only key(s) left out" in out.warnings[0]


def test_overflow_keeps_next_key_before_old_and_later_ahead_last() -> None:
    later = make_key(6, NOW + 2000, NOW + 3000, NOW + 5000)
    out = render(KeyFileFormat.NGINX, ring(later, OLD1, AHEAD, CURRENT), NOW, slots=3)
    got = [nginx_fields(out.files[slot_file_name(i)]) for i in range(3)]
    assert got == [full(CURRENT), full(AHEAD), full(OLD1)]
    assert any("1 key(s) announced ahead left out" in w for w in out.warnings)


def test_too_few_slots_refused() -> None:
    with pytest.raises(KeyFileError):
        render(KeyFileFormat.NGINX, FULL, NOW, slots=1)


# ---------------------------------------------------------------- HAProxy


def haproxy_lines(out: RenderedKeys) -> list[bytes]:
    content = out.files[HAPROXY_FILE]
    assert content.endswith(b"\n") and b"\n\n" not in content and b"\r" not in content
    return [base64.b64decode(line, validate=True) for line in content.splitlines()]


def test_haproxy_order_and_layout() -> None:
    out = render(KeyFileFormat.HAPROXY, FULL, NOW)
    assert list(out.files) == [HAPROXY_FILE]
    lines = haproxy_lines(out)
    # TLS_TICKETS_NO (3) lines: the next-to-last encrypts, the last is announced ahead
    assert [haproxy_fields(b) for b in lines] == [full(OLD1), full(CURRENT), full(AHEAD)]
    assert lines[1][16:48] == CURRENT.aes_secret and lines[1][48:80] == CURRENT.hmac_secret
    # OLD2 does not fit HAProxy's three-key ring: said, in counts only
    assert len(out.warnings) == 1 and "1 decrypt-only key(s) left out" in out.warnings[0]


def test_haproxy_encrypting_index_is_the_current_key() -> None:
    """Replay bind_parse_tls_ticket_keys: slot i % 3, enc index (n - 2) % 3."""
    for r in (ring(CURRENT), ring(CURRENT, AHEAD), ring(OLD1, CURRENT), FULL):
        lines = haproxy_lines(render(KeyFileFormat.HAPROXY, r, NOW))
        assert len(lines) >= 3
        ring3: list[bytes] = [b""] * 3
        for i, blob in enumerate(lines):
            ring3[i % 3] = blob
        enc = (len(lines) - 2) % 3
        assert haproxy_fields(ring3[enc]) == full(CURRENT)


def test_haproxy_fillers_without_old_or_ahead() -> None:
    lines = haproxy_lines(render(KeyFileFormat.HAPROXY, ring(CURRENT), NOW))
    assert haproxy_fields(lines[1]) == full(CURRENT)
    assert len({b[:16] for b in lines}) == 3  # fillers have names of their own
    assert all(len(b) == 80 for b in lines)


# ---------------------------------------------------------------- Traffic Server, httpd


def test_ats_entries() -> None:
    out = render(KeyFileFormat.ATS, FULL, NOW)
    assert list(out.files) == [ATS_FILE]
    data = out.files[ATS_FILE]
    assert len(data) == 48 * 4
    got = [short_fields(data[i : i + 48]) for i in range(0, len(data), 48)]
    assert got == [short(CURRENT), short(AHEAD), short(OLD1), short(OLD2)]
    assert data[16:32] == bytes([0x44]) * 16  # first half of CURRENT's hmac secret
    assert data[32:48] == bytes([0x84]) * 16  # first half of CURRENT's aes secret


def test_httpd_single_key() -> None:
    out = render(KeyFileFormat.HTTPD, FULL, NOW)
    assert list(out.files) == [HTTPD_FILE]
    assert short_fields(out.files[HTTPD_FILE]) == short(CURRENT)


# ---------------------------------------------------------------- every format


@pytest.mark.parametrize("fmt", list(KeyFileFormat))
def test_no_current_key_refused(fmt: KeyFileFormat) -> None:
    with pytest.raises(KeyFileError, match="no encrypting key"):
        render(fmt, ring(), NOW)
    with pytest.raises(KeyFileError):
        render(fmt, ring(ERASED), NOW)  # everything erased
    with pytest.raises(KeyFileError):
        render(fmt, ring(AHEAD), NOW)  # nothing has begun


@pytest.mark.parametrize("fmt", list(KeyFileFormat))
def test_erased_key_never_rendered(fmt: KeyFileFormat) -> None:
    out = render(fmt, FULL, NOW, slots=8)
    for data in out.files.values():
        blobs = [data, *(base64.b64decode(x) for x in data.splitlines() if fmt == "haproxy")]
        for blob in blobs:
            assert ERASED.name not in blob
            assert ERASED.hmac_secret[:16] not in blob and ERASED.aes_secret[:16] not in blob


@pytest.mark.parametrize("fmt", list(KeyFileFormat))
def test_warnings_and_repr_carry_no_key_bytes(fmt: KeyFileFormat) -> None:
    t = NOW
    keys = [
        TicketKey.generate(t - 3700, t - 3600, t - 3000, t + 100),
        TicketKey.generate(t - 2700, t - 2600, t - 2000, t + 200),
        TicketKey.generate(t - 1700, t - 1600, t - 1000, t + 300),
        TicketKey.generate(t - 700, t - 600, t - 100, t + 400),  # current, past its window
        TicketKey.generate(t - 10, t + 500, t + 600, t + 700),
        TicketKey.generate(t - 10, t + 600, t + 700, t + 800),
    ]
    out = render(fmt, ring(*keys), NOW, slots=2)
    if fmt is not KeyFileFormat.HTTPD and fmt is not KeyFileFormat.ATS:
        assert any("left out" in w for w in out.warnings)
    assert any("past the end of its encrypt window" in w for w in out.warnings)
    texts = [*out.warnings, repr(out)]
    for k in keys:
        for raw in (k.name, k.hmac_secret, k.aes_secret, k.hmac_secret[:16], k.aes_secret[:16]):
            forms = {
                raw.hex(),
                raw.hex().upper(),
                base64.b64encode(raw).decode(),
                base64.b64encode(raw).decode().rstrip("="),
                base64.urlsafe_b64encode(raw).decode().rstrip("="),
                raw.decode("latin-1"),
                repr(raw),
            }
            for text in texts:
                for form in forms:
                    assert form not in text
    for data in out.files.values():
        assert repr(data) not in repr(out)


def test_format_accepts_plain_string() -> None:
    out = render(KeyFileFormat("nginx"), FULL, NOW)
    assert out.files == render(KeyFileFormat.NGINX, FULL, NOW).files


# ---------------------------------------------------------------- atomic writes


def test_write_atomic_mode_and_replace(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        target = tmp_path / "ticket.0.key"
        assert write_atomic(target, b"a" * 80) is True
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert target.read_bytes() == b"a" * 80

        # a reader holding the old file keeps reading the old content: a new inode replaced it
        with open(target, "rb") as reader:
            inode = os.fstat(reader.fileno()).st_ino
            assert write_atomic(target, b"b" * 80) is True
            assert reader.read() == b"a" * 80
        assert target.stat().st_ino != inode
        assert target.read_bytes() == b"b" * 80
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ticket.0.key"]  # no temp left
    finally:
        os.umask(old_umask)


def test_write_atomic_identical_content_is_a_no_op(tmp_path: Path) -> None:
    target = tmp_path / "tls-ticket-keys"
    assert write_atomic(target, b"x" * 48) is True
    inode = target.stat().st_ino
    assert write_atomic(target, b"x" * 48) is False
    assert target.stat().st_ino == inode
    os.chmod(target, 0o644)  # identical content, wrong mode: mode fixed, still no rewrite
    assert write_atomic(target, b"x" * 48) is False
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.stat().st_ino == inode


def test_write_atomic_custom_mode_survives_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        target = tmp_path / "k"
        write_atomic(target, b"k", mode=0o640)
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


def test_write_atomic_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    assert write_atomic(link, b"keep") is True
    assert not link.is_symlink() and link.read_bytes() == b"keep"
    assert elsewhere.read_bytes() == b"keep"


def test_write_atomic_failure_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "adir"
    target.mkdir()  # renaming a file over a directory fails
    with pytest.raises(OSError):
        write_atomic(target, b"z")
    assert [p.name for p in tmp_path.iterdir()] == ["adir"]


@pytest.mark.parametrize("mode", [0o700, 0o750, 0o770])
def test_check_private_dir_accepts(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "keys"
    d.mkdir()
    os.chmod(d, mode)
    check_private_dir(d)


@pytest.mark.parametrize("mode", [0o755, 0o777, 0o701, 0o702, 0o704])
def test_check_private_dir_refuses(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "keys"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(UnsafeDirectoryError) as info:
        check_private_dir(d)
    assert isinstance(info.value, KeyFileError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and f"{mode:04o}" in str(info.value)


def test_check_private_dir_missing_or_not_a_dir(tmp_path: Path) -> None:
    with pytest.raises(UnsafeDirectoryError, match="does not exist"):
        check_private_dir(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(UnsafeDirectoryError, match="not a directory"):
        check_private_dir(f)
