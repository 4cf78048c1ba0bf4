"""The recovery payload on disk: each image's encrypted features f_enc, sealed under the passphrase.

f_enc is what the ID-Decryptor needs, and on its own it is not safe to publish: the sign pad keyed
by the password leaves the features' magnitudes as they are, and a folder made under one
passphrase shares one pad per element, which an attacker can estimate across the folder's files.
So the stored file is sealed with AES-256-GCM (the ``cryptography`` package) under a key that the
passphrase's scrypt derivation gives beside the password vector (``passwords.derive``): without
the passphrase a file reveals its length and nothing else; a wrong passphrase, a modified file,
or a file moved onto another image's name fails authentication and is one clear error.

File layout: MAGIC, a 12-byte random nonce, then the AES-GCM ciphertext and tag of the array in
``.npy`` format.  The associated data is MAGIC + the image's relative name, which binds the file
to the image it recovers.
"""
from __future__ import annotations

import io
import os

import numpy as np

from mema_jax.errors import InputError

MAGIC = b"MEMA-JAX sealed features v1\n"
SUFFIX = ".sealed"
NONCE_BYTES = 12


class PayloadError(InputError):
    """A sealed features file that cannot be opened; the message names it and says why."""


def _encrypt(key: bytes, name: str, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, data, MAGIC + name.encode("utf-8"))


def _decrypt(key: bytes, name: str, blob: bytes, source: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_BYTES + 16:
        raise PayloadError(f"{source}: not a sealed features file (written by deid_jax.deidentify)")
    nonce = blob[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES:], MAGIC + name.encode("utf-8"))
    except InvalidTag:
        raise PayloadError(f"{source}: does not open with this passphrase (a wrong passphrase, or the file was "
                           "modified or belongs to another image)") from None


def seal(key: bytes, name: str, array: np.ndarray) -> bytes:
    """``array`` as a sealed file's bytes, bound to the image ``name``."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return _encrypt(key, name, buf.getvalue())


def unseal(key: bytes, name: str, blob: bytes, source: str) -> np.ndarray:
    """The array sealed in ``blob`` (read from ``source``) for the image ``name``."""
    return np.load(io.BytesIO(_decrypt(key, name, blob, source)), allow_pickle=False)


def seal_arrays(key: bytes, name: str, arrays: dict[str, np.ndarray]) -> bytes:
    """Several named arrays (``.npz``, no pickles) as one sealed file bound to ``name``: a whole
    photo's faces, each with its warp and features (``photos.folder``)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return _encrypt(key, name, buf.getvalue())


def unseal_arrays(key: bytes, name: str, blob: bytes, source: str) -> dict[str, np.ndarray]:
    """The arrays :func:`seal_arrays` sealed, or a PayloadError naming ``source``."""
    with np.load(io.BytesIO(_decrypt(key, name, blob, source)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
