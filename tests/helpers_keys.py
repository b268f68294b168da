"""Test support: the bus keys of an in-process test farm (a ring signer, guest on loopback)."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sessionbus.schemas.sealing import BusKeys, load_bus_keys, new_key


def farm_keys(root: bytes | None = None, *, signing: Ed25519PrivateKey | None = None) -> BusKeys:
    """Keys a test farm's processes hold: a root bus key, the ring signing key (so rings can
    be published and are verified), and the single-user allowance for ``guest``, which every
    test role runs as on the loopback broker."""
    return BusKeys([root or new_key()], signing_key=signing or Ed25519PrivateKey.generate(),
                   any_origin_users={"guest"})


def keys_for(key_file: str | os.PathLike[str]) -> BusKeys:
    """What a test farm's roles on ``key_file`` hold (``farm_support.role_env``), in-process:
    the bus keys, the farm's ring signing key, and the guest allowance."""
    from tests.farm_support import ring_files

    sign, public = ring_files(key_file)
    return load_bus_keys(key_file, public_key_file=public, signing_key_file=sign,
                         any_origin_users={"guest"})
