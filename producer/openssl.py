"""Guarded cffi (ABI mode) binding to the libssl that CPython's ``_ssl`` links.

Why: the server session-cache callbacks and the ticket-key callback are exported by the system
libssl but by no Python API (pyOpenSSL's bundled OpenSSL lacks them). A CPython ``SSLContext``
keeps its ``SSL_CTX *`` as the first field after the object header, so opening the *same* libssl
lets us install the callbacks on a standard context that asyncio then serves with. Because that
is a layout trick, every install is guarded (library version and a live options round trip).

The callbacks run inside ``SSL_do_handshake`` on the serving thread: they must answer from
memory, and an exception in one is logged and treated as a miss (never a crash or a leak).
"""

from __future__ import annotations

import atexit
import ctypes.util
import logging
import os
import ssl
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, Protocol

log = logging.getLogger(__name__)

__all__ = [
    "BindingError",
    "SessionCallbacks",
    "SessionInfo",
    "TicketKeys",
    "binding_available",
    "check_context",
    "install_session_cache",
    "install_ticket_keys",
    "library_paths",
    "session_der_id",
    "session_der_info",
    "uninstall",
]

_CDEF = """
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_mac_ctx_st EVP_MAC_CTX;
typedef struct engine_st ENGINE;
typedef struct ossl_param_st {
    const char *key;
    unsigned int data_type;
    void *data;
    size_t data_size;
    size_t return_size;
} OSSL_PARAM;

/* libcrypto */
unsigned long OpenSSL_version_num(void);
void ERR_clear_error(void);
int RAND_bytes(unsigned char *buf, int num);
const EVP_CIPHER *EVP_aes_256_cbc(void);
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, ENGINE *impl,
                       const unsigned char *key, const unsigned char *iv);
int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, ENGINE *impl,
                       const unsigned char *key, const unsigned char *iv);
int EVP_MAC_CTX_set_params(EVP_MAC_CTX *ctx, const OSSL_PARAM params[]);
OSSL_PARAM OSSL_PARAM_construct_utf8_string(const char *key, char *buf, size_t bsize);
OSSL_PARAM OSSL_PARAM_construct_octet_string(const char *key, void *buf, size_t bsize);
OSSL_PARAM OSSL_PARAM_construct_end(void);

/* libssl */
uint64_t SSL_CTX_get_options(const SSL_CTX *ctx);
long SSL_CTX_ctrl(SSL_CTX *ctx, int cmd, long larg, void *parg);
long SSL_CTX_set_timeout(SSL_CTX *ctx, long t);
int SSL_CTX_set_session_id_context(SSL_CTX *ctx, const unsigned char *sid_ctx, unsigned int len);
int SSL_set_session_id_context(SSL *ssl, const unsigned char *sid_ctx, unsigned int len);
void SSL_CTX_sess_set_new_cb(SSL_CTX *ctx, int (*cb)(SSL *, SSL_SESSION *));
void SSL_CTX_sess_set_remove_cb(SSL_CTX *ctx, void (*cb)(SSL_CTX *, SSL_SESSION *));
void SSL_CTX_sess_set_get_cb(SSL_CTX *ctx,
                             SSL_SESSION *(*cb)(SSL *, const unsigned char *, int, int *));
void SSL_CTX_set_client_hello_cb(SSL_CTX *ctx, int (*cb)(SSL *, int *, void *), void *arg);
int SSL_CTX_set_tlsext_ticket_key_evp_cb(SSL_CTX *ctx,
    int (*cb)(SSL *, unsigned char *, unsigned char *, EVP_CIPHER_CTX *, EVP_MAC_CTX *, int));
int SSL_version(const SSL *s);
const unsigned char *SSL_SESSION_get_id(const SSL_SESSION *s, unsigned int *len);
const unsigned char *SSL_SESSION_get0_id_context(const SSL_SESSION *s, unsigned int *len);
long SSL_SESSION_get_time(const SSL_SESSION *s);
long SSL_SESSION_get_timeout(const SSL_SESSION *s);
int i2d_SSL_SESSION(SSL_SESSION *in, unsigned char **pp);
SSL_SESSION *d2i_SSL_SESSION(SSL_SESSION **a, const unsigned char **pp, long length);
void SSL_SESSION_free(SSL_SESSION *s);
"""

# Callback C types (ffi.callback needs them spelled out).
_NEW_CB = "int(SSL *, SSL_SESSION *)"
_GET_CB = "SSL_SESSION *(SSL *, const unsigned char *, int, int *)"
_REMOVE_CB = "void(SSL_CTX *, SSL_SESSION *)"
_HELLO_CB = "int(SSL *, int *, void *)"
_TICKET_CB = "int(SSL *, unsigned char *, unsigned char *, EVP_CIPHER_CTX *, EVP_MAC_CTX *, int)"

_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_SERVER = 0x0002
_SSL_SESS_CACHE_NO_INTERNAL = 0x0100 | 0x0200  # NO_INTERNAL_LOOKUP | NO_INTERNAL_STORE
_SSL_CLIENT_HELLO_SUCCESS = 1
_SSL_CLIENT_HELLO_ERROR = 0
_TLS1_3_VERSION = 0x0304
_OSSL_PARAM_UTF8_STRING = 4
_TICKET_NAME_SIZE = 16
_TICKET_IV_SIZE = 16  # AES-256-CBC
_AES_KEY_SIZE = 32
MAX_SID_CTX = 32  # SSL_MAX_SID_CTX_LENGTH

# PySSLContext is {PyObject_HEAD; SSL_CTX *ctx; ...} in CPython 3.x: the pointer sits right after
# the object header, whose size object.__basicsize__ gives (16 on 64-bit, more on debug builds).
_SSL_CTX_OFFSET = object.__basicsize__
# SSL_OP_TLSEXT_PADDING only pads a *client* hello: flipping it for a moment on a server context
# changes nothing on the wire, so it is a safe bit for the options round trip of the guard.
_PROBE_OPTION = 0x10


class BindingError(RuntimeError):
    """The binding cannot be used safely with this interpreter's ssl module."""


class SessionCallbacks(Protocol):
    def on_new(self, session_id: bytes, der: bytes, expires_at: float) -> None: ...

    def on_get(self, session_id: bytes) -> bytes | None: ...

    def on_remove(self, session_id: bytes) -> None: ...


class TicketKeys(Protocol):
    def encrypt_key(self) -> tuple[bytes, bytes, bytes] | None: ...

    def decrypt_key(self, name: bytes) -> tuple[bytes, bytes, bool] | None: ...

    def on_decrypt(self, result: str) -> None: ...


class SessionInfo(NamedTuple):
    session_id: bytes
    sid_ctx: bytes
    expires_at: float  # SSL_SESSION_get_time + SSL_SESSION_get_timeout (unix seconds)


# ---------------------------------------------------------------------------------------------
# Loading the library _ssl mapped


@dataclass
class _Binding:
    ffi: Any
    ssl: Any  # libssl handle
    crypto: Any  # libcrypto handle
    paths: tuple[str, str]
    # Constant C strings referenced by OSSL_PARAMs (must outlive every call that uses them).
    c_digest: Any = None
    c_key: Any = None
    c_sha256: Any = None


_load_lock = threading.Lock()
_binding: _Binding | None = None
_load_error: str | None = None


def _mapped(prefix: str) -> list[str]:
    """Paths of the shared objects named ``prefix*`` mapped into this process, first seen first."""
    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    path = parts[5].strip()
                    if os.path.basename(path).startswith(prefix) and path not in found:
                        found.append(path)
    except OSError:
        pass
    return found


def _candidates(name: str) -> list[str]:
    paths = _mapped(f"lib{name}.so")
    if not paths:  # no /proc, or a statically linked _ssl: the guard below decides
        found = ctypes.util.find_library(name)
        if found:
            paths.append(found)
    return paths


def _load() -> _Binding:
    global _binding, _load_error
    if _binding is not None:
        return _binding
    with _load_lock:
        if _binding is not None:
            return _binding
        if _load_error is not None:
            raise BindingError(_load_error)
        try:
            _binding = _open()
        except BindingError as exc:
            _load_error = str(exc)
            raise
        return _binding


def _open() -> _Binding:
    try:
        import _ssl  # noqa: F401  (maps the libssl CPython uses)

        import cffi
    except ImportError as exc:
        raise BindingError(f"sessionbus openssl binding unavailable: {exc}") from exc
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    wanted = ssl.OPENSSL_VERSION_NUMBER
    seen: list[str] = []
    for crypto_path in _candidates("crypto"):
        try:
            crypto = ffi.dlopen(crypto_path)
            version = int(crypto.OpenSSL_version_num())
        except (OSError, AttributeError) as exc:
            seen.append(f"{crypto_path}: {exc}")
            continue
        if version != wanted:
            seen.append(f"{crypto_path}: version {version:#x}")
            continue
        for ssl_path in _candidates("ssl"):
            try:
                libssl = ffi.dlopen(ssl_path)
                libssl.SSL_CTX_sess_set_get_cb  # noqa: B018  (exported?)
            except (OSError, AttributeError) as exc:
                seen.append(f"{ssl_path}: {exc}")
                continue
            b = _Binding(ffi, libssl, crypto, (ssl_path, crypto_path))
            b.c_digest = ffi.new("char[]", b"digest")
            b.c_key = ffi.new("char[]", b"key")
            b.c_sha256 = ffi.new("char[]", b"SHA256")
            return b
    raise BindingError(
        f"no libssl/libcrypto matching ssl.OPENSSL_VERSION_NUMBER {wanted:#x} "
        f"({ssl.OPENSSL_VERSION}); tried: {'; '.join(seen) or 'nothing found'}"
    )


def library_paths() -> tuple[str, str]:
    """(libssl, libcrypto) paths the binding opened."""
    return _load().paths


_available: str | None = None
_available_checked = False


def binding_available() -> str | None:
    """None if the binding loads and passes the guard on a fresh server context, else why not."""
    global _available, _available_checked
    if not _available_checked:
        try:
            _ctx_ptr(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        except (BindingError, OSError) as exc:
            _available = str(exc)
        _available_checked = True
    return _available


# ---------------------------------------------------------------------------------------------
# The guarded SSL_CTX pointer


def _ctx_ptr(ctx: ssl.SSLContext) -> Any:
    """The context's ``SSL_CTX *``, after checking the binding really is talking to it."""
    if not isinstance(ctx, ssl.SSLContext):
        raise TypeError(f"expected ssl.SSLContext, got {type(ctx).__name__}")
    b = _load()
    version = int(b.crypto.OpenSSL_version_num())
    if version != ssl.OPENSSL_VERSION_NUMBER:
        raise BindingError(
            f"OpenSSL version mismatch: binding has {version:#x}, "
            f"ssl module has {ssl.OPENSSL_VERSION_NUMBER:#x} ({ssl.OPENSSL_VERSION})"
        )
    raw = int(b.ffi.cast("uintptr_t *", id(ctx) + _SSL_CTX_OFFSET)[0])
    if raw < 0x10000 or raw % b.ffi.alignof("void *"):
        raise BindingError(
            f"SSLContext layout not recognised: no SSL_CTX pointer at offset {_SSL_CTX_OFFSET}"
        )
    ptr = b.ffi.cast("SSL_CTX *", raw)
    # Same options seen from both sides, and a flip of one bit through ctx.options shows up in C.
    before = int(ctx.options)
    ok = int(b.ssl.SSL_CTX_get_options(ptr)) == before
    if ok:
        ctx.options = ssl.Options(before ^ _PROBE_OPTION)
        try:
            ok = int(b.ssl.SSL_CTX_get_options(ptr)) == before ^ _PROBE_OPTION
        finally:
            ctx.options = ssl.Options(before)
        ok = ok and int(b.ssl.SSL_CTX_get_options(ptr)) == before
    if not ok:
        raise BindingError(
            f"SSLContext layout not recognised: SSL_CTX_get_options at offset {_SSL_CTX_OFFSET} "
            f"disagrees with ctx.options (libssl {b.paths[0]})"
        )
    return ptr


def check_context(ctx: ssl.SSLContext) -> None:
    """Run the guard on ``ctx`` alone (BindingError/TypeError if the binding cannot use it)."""
    _ctx_ptr(ctx)


# ---------------------------------------------------------------------------------------------
# Keeping callbacks alive, and resetting them at exit


@dataclass
class _Hooks:
    """The cffi callback objects installed on one SSL_CTX (a GC'd one crashes the next call)."""

    ptr: Any
    live: dict[str, Any] = field(default_factory=dict)
    retired: list[Any] = field(default_factory=list)  # replaced ones: may be running right now


_hooks_lock = threading.Lock()
_installed: dict[int, _Hooks] = {}  # keyed by SSL_CTX address


def _hooks_for(ctx: ssl.SSLContext, ptr: Any) -> _Hooks:
    b = _load()
    addr = int(b.ffi.cast("uintptr_t", ptr))
    with _hooks_lock:
        hooks = _installed.get(addr)
        if hooks is None:
            hooks = _installed[addr] = _Hooks(ptr)
            # Every SSL socket holds its context, so once ctx is collected nothing handshakes on
            # it: reset and drop the callbacks before CPython frees the SSL_CTX.
            weakref.finalize(ctx, _release, addr).atexit = False
        return hooks


def _keep(hooks: _Hooks, name: str, cb: Any) -> None:
    old = hooks.live.get(name)
    if old is not None:
        hooks.retired.append(old)
    hooks.live[name] = cb


def _set_callbacks(ptr: Any, names: list[str], on: _Hooks | None) -> None:
    """Point the named slots at ``on``'s callbacks, or at NULL when ``on`` is None."""
    b = _load()
    null = b.ffi.NULL

    def cb(name: str) -> Any:
        return on.live[name] if on is not None else null

    for name in names:
        if name == "new":
            b.ssl.SSL_CTX_sess_set_new_cb(ptr, cb(name))
        elif name == "get":
            b.ssl.SSL_CTX_sess_set_get_cb(ptr, cb(name))
        elif name == "remove":
            b.ssl.SSL_CTX_sess_set_remove_cb(ptr, cb(name))
        elif name == "hello":
            b.ssl.SSL_CTX_set_client_hello_cb(ptr, cb(name), null)
        elif name == "ticket":
            b.ssl.SSL_CTX_set_tlsext_ticket_key_evp_cb(ptr, cb(name))


def _release(addr: int) -> None:
    # No _hooks_lock here: a context in a reference cycle is freed by the cyclic GC, which can
    # run inside this module's own locked sections (any allocation there), and the lock is not
    # reentrant. dict.pop is atomic, and nothing else touches a dead context's entry.
    hooks = _installed.pop(addr, None)
    if hooks is not None:
        _set_callbacks(hooks.ptr, list(hooks.live), None)


@atexit.register
def _reset_all() -> None:
    # Late in shutdown CPython frees sockets (SSL_free -> remove callback) after cffi objects are
    # gone: NULL every slot now. The objects stay referenced in case a daemon thread is in one.
    with _hooks_lock:
        hooks_list = list(_installed.values())
    for hooks in hooks_list:
        _set_callbacks(hooks.ptr, list(hooks.live), None)


def uninstall(ctx: ssl.SSLContext) -> None:
    """Reset every callback this module installed on ``ctx`` (sid_ctx and cache mode stay)."""
    ptr = _ctx_ptr(ctx)
    addr = int(_load().ffi.cast("uintptr_t", ptr))
    with _hooks_lock:
        hooks = _installed.get(addr)
        if hooks is None:
            return
        names = list(hooks.live)
        hooks.retired.extend(hooks.live.values())
        hooks.live.clear()
    _set_callbacks(ptr, names, None)


def _onerror(what: str, outcome: str) -> Callable[..., None]:
    def report(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        # Type and frames only: a message could quote session bytes or keys.
        try:
            frames = "".join(traceback.format_tb(tb))
            log.error(
                "openssl %s callback raised %s (%s)\n%s", what, exc_type.__name__, outcome, frames
            )
        except Exception:
            pass
        return None  # cffi then returns the callback's `error` value

    return report


# ---------------------------------------------------------------------------------------------
# SSL_SESSION helpers


def _session_id(b: _Binding, sess: Any) -> bytes:
    n = b.ffi.new("unsigned int *")
    p = b.ssl.SSL_SESSION_get_id(sess, n)
    return bytes(b.ffi.buffer(p, n[0])) if n[0] else b""


def _session_sid_ctx(b: _Binding, sess: Any) -> bytes:
    n = b.ffi.new("unsigned int *")
    p = b.ssl.SSL_SESSION_get0_id_context(sess, n)
    return bytes(b.ffi.buffer(p, n[0])) if n[0] else b""


def _session_expires(b: _Binding, sess: Any) -> int:
    return int(b.ssl.SSL_SESSION_get_time(sess)) + int(b.ssl.SSL_SESSION_get_timeout(sess))


def _i2d(b: _Binding, sess: Any) -> bytes:
    size = int(b.ssl.i2d_SSL_SESSION(sess, b.ffi.NULL))
    if size <= 0:
        raise ValueError("i2d_SSL_SESSION failed")
    buf = b.ffi.new("unsigned char[]", size)
    pp = b.ffi.new("unsigned char **", buf)
    if int(b.ssl.i2d_SSL_SESSION(sess, pp)) != size:
        raise ValueError("i2d_SSL_SESSION failed")
    return bytes(b.ffi.buffer(buf, size))


def _d2i(b: _Binding, der: bytes) -> Any:
    """A new SSL_SESSION (caller owns the reference), or NULL with the error queue cleared.

    A stale entry on OpenSSL's per-thread error queue would make the *handshake's*
    SSL_get_error report SSL_ERROR_SSL instead of WANT_READ, so never leave one there.
    """
    buf = b.ffi.from_buffer(der)
    pp = b.ffi.new("const unsigned char **", b.ffi.cast("const unsigned char *", buf))
    sess = b.ssl.d2i_SSL_SESSION(b.ffi.NULL, pp, len(der))
    if sess == b.ffi.NULL:
        b.crypto.ERR_clear_error()
    return sess


def session_der_info(der: bytes) -> SessionInfo:
    """Session id, sid_ctx and expiry of a serialized session; ValueError if OpenSSL can't parse."""
    b = _load()
    sess = _d2i(b, bytes(der))
    if sess == b.ffi.NULL:
        raise ValueError("not a DER SSL_SESSION")
    try:
        return SessionInfo(
            _session_id(b, sess), _session_sid_ctx(b, sess), float(_session_expires(b, sess))
        )
    finally:
        b.ssl.SSL_SESSION_free(sess)


def session_der_id(der: bytes) -> bytes:
    """The session id embedded in a serialized session; ValueError if unparsable."""
    return session_der_info(der).session_id


# ---------------------------------------------------------------------------------------------
# Server session cache


def install_session_cache(
    ctx: ssl.SSLContext, callbacks: SessionCallbacks, *, sid_ctx: bytes, timeout: int
) -> None:
    """Serve ``ctx``'s sessions from ``callbacks`` (external cache only, no internal one).

    Stateful tickets (``ctx.options |= ssl.OP_NO_TICKET``) are what put TLS 1.3, and TLS 1.2
    without a session id, through this cache; the caller decides.
    """
    sid_ctx = bytes(sid_ctx)
    if not 0 < len(sid_ctx) <= MAX_SID_CTX:
        raise ValueError(f"sid_ctx must be 1..{MAX_SID_CTX} bytes")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    ptr = _ctx_ptr(ctx)
    b = _load()
    ffi, libssl = b.ffi, b.ssl
    c_sid_ctx = ffi.new("unsigned char[]", sid_ctx)  # kept alive by the hello closure
    sid_len = len(sid_ctx)

    def new_cb(_ssl: Any, sess: Any) -> int:
        callbacks.on_new(_session_id(b, sess), _i2d(b, sess), float(_session_expires(b, sess)))
        return 0  # we did not keep a reference (returning 1 would hand one to us to free)

    def get_cb(_ssl: Any, data: Any, length: int, copy: Any) -> Any:
        copy[0] = 0  # OpenSSL takes over the reference d2i gave us (copy=1 leaks ~1 KB each)
        sid = bytes(ffi.buffer(data, length))
        der = callbacks.on_get(sid)
        if der is None:
            return ffi.NULL
        sess = _d2i(b, der)
        if sess == ffi.NULL:
            log.warning("session cache returned an unparsable session; treated as a miss")
            return ffi.NULL
        try:
            ok = (
                _session_id(b, sess) == sid
                and _session_sid_ctx(b, sess) == sid_ctx
                and _session_expires(b, sess) >= time.time()
            )
        except BaseException:
            libssl.SSL_SESSION_free(sess)
            raise
        if not ok:  # another id, another service's session, or expired: a miss
            libssl.SSL_SESSION_free(sess)
            return ffi.NULL
        return sess

    def remove_cb(_ctx: Any, sess: Any) -> None:
        callbacks.on_remove(_session_id(b, sess))

    def hello_cb(ssl_: Any, _al: Any, _arg: Any) -> int:
        # CPython 3.13 sets sid_ctx "Python\0" on every server connection, overriding the
        # context's; the client hello callback runs after that and before any session lookup.
        if libssl.SSL_set_session_id_context(ssl_, c_sid_ctx, sid_len) != 1:
            b.crypto.ERR_clear_error()
            return _SSL_CLIENT_HELLO_ERROR
        return _SSL_CLIENT_HELLO_SUCCESS

    hooks = _hooks_for(ctx, ptr)
    with _hooks_lock:
        _keep(
            hooks,
            "new",
            ffi.callback(
                _NEW_CB, new_cb, error=0, onerror=_onerror("new-session", "not published")
            ),
        )
        _keep(
            hooks,
            "get",
            ffi.callback(_GET_CB, get_cb, error=ffi.NULL, onerror=_onerror("get-session", "miss")),
        )
        _keep(
            hooks,
            "remove",
            ffi.callback(_REMOVE_CB, remove_cb, onerror=_onerror("remove-session", "ignored")),
        )
        # Fail closed: a connection whose sid_ctx could not be set must not resume or publish.
        _keep(
            hooks,
            "hello",
            ffi.callback(
                _HELLO_CB,
                hello_cb,
                error=_SSL_CLIENT_HELLO_ERROR,
                onerror=_onerror("client-hello", "handshake failed"),
            ),
        )
    if libssl.SSL_CTX_set_session_id_context(ptr, c_sid_ctx, sid_len) != 1:
        b.crypto.ERR_clear_error()
        raise BindingError("SSL_CTX_set_session_id_context failed")
    libssl.SSL_CTX_ctrl(
        ptr,
        _SSL_CTRL_SET_SESS_CACHE_MODE,
        _SSL_SESS_CACHE_SERVER | _SSL_SESS_CACHE_NO_INTERNAL,
        ffi.NULL,
    )
    libssl.SSL_CTX_set_timeout(ptr, int(timeout))
    _set_callbacks(ptr, ["new", "get", "remove", "hello"], hooks)


# ---------------------------------------------------------------------------------------------
# Session-ticket keys


def install_ticket_keys(ctx: ssl.SSLContext, keys: TicketKeys) -> None:
    """Encrypt/decrypt session tickets on ``ctx`` with ``keys`` (stateless tickets: leave
    ``OP_NO_TICKET`` clear). Reported decrypt results: "current" (ticket under the current key),
    "renewed" (under an older key: accepted, a new ticket is issued), "unknown" (no such key:
    full handshake). Known-key results are reported before OpenSSL checks the ticket's HMAC.
    """
    ptr = _ctx_ptr(ctx)
    b = _load()
    ffi, libssl, crypto = b.ffi, b.ssl, b.crypto

    def set_mac(mac_ctx: Any, hmac_key: bytes) -> bool:
        c_hmac = ffi.new("unsigned char[]", hmac_key)
        params = ffi.new("OSSL_PARAM[3]")
        params[0] = crypto.OSSL_PARAM_construct_utf8_string(b.c_digest, b.c_sha256, 0)
        params[1] = crypto.OSSL_PARAM_construct_octet_string(b.c_key, c_hmac, len(hmac_key))
        params[2] = crypto.OSSL_PARAM_construct_end()
        return int(crypto.EVP_MAC_CTX_set_params(mac_ctx, params)) == 1

    def report(result: str) -> None:
        try:
            keys.on_decrypt(result)
        except Exception:
            log.exception("TicketKeys.on_decrypt failed")

    def ticket_cb(
        ssl_: Any, key_name: Any, iv: Any, cipher_ctx: Any, mac_ctx: Any, enc: int
    ) -> int:
        if enc:
            key = keys.encrypt_key()
            if key is None:
                return 0  # no ticket this time
            name, hmac_key, aes_key = key
            if len(name) != _TICKET_NAME_SIZE or len(aes_key) != _AES_KEY_SIZE or not hmac_key:
                raise ValueError("bad ticket key sizes")
            ffi.memmove(key_name, name, _TICKET_NAME_SIZE)
            ok = (
                crypto.RAND_bytes(iv, _TICKET_IV_SIZE) == 1
                and crypto.EVP_EncryptInit_ex(
                    cipher_ctx, crypto.EVP_aes_256_cbc(), ffi.NULL, aes_key, iv
                )
                == 1
                and set_mac(mac_ctx, hmac_key)
            )
            if not ok:
                crypto.ERR_clear_error()
                log.error("ticket encryption setup failed; no ticket issued")
                return 0
            return 1
        found = keys.decrypt_key(bytes(ffi.buffer(key_name, _TICKET_NAME_SIZE)))
        if found is None:
            report("unknown")
            return 0  # full handshake, and a fresh ticket under the current key
        hmac_key, aes_key, is_current = found
        if len(aes_key) != _AES_KEY_SIZE or not hmac_key:
            raise ValueError("bad ticket key sizes")
        ok = (
            set_mac(mac_ctx, hmac_key)
            and crypto.EVP_DecryptInit_ex(
                cipher_ctx, crypto.EVP_aes_256_cbc(), ffi.NULL, aes_key, iv
            )
            == 1
        )
        if not ok:
            crypto.ERR_clear_error()
            log.error("ticket decryption setup failed; full handshake")
            return 0
        report("current" if is_current else "renewed")
        # 2 = accept and issue a new ticket: for old keys, and always in TLS 1.3 (as OpenSSL's
        # own keys do), or TLS 1.3 clients would present the same ticket forever.
        if not is_current or libssl.SSL_version(ssl_) == _TLS1_3_VERSION:
            return 2
        return 1

    hooks = _hooks_for(ctx, ptr)
    with _hooks_lock:
        # 0 is the miss for both directions: no ticket issued / ticket not decrypted.
        _keep(
            hooks,
            "ticket",
            ffi.callback(_TICKET_CB, ticket_cb, error=0, onerror=_onerror("ticket-key", "miss")),
        )
    _set_callbacks(ptr, ["ticket"], hooks)
