"""Password vectors: the 512-d key of the ID-Encryptor / ID-Decryptor.

During training every sample gets a fresh random vector (a standard normal draw), and a second
one as the "wrong" password.  At use, a vector comes from a passphrase: scrypt (RFC 7914, in
Python's hashlib) stretches the passphrase with a salt into a 256-bit seed, and the vector is a
standard normal draw from numpy's PCG64 seeded with it.  The same passphrase and salt always
give the same vector, in any process on any machine; without the passphrase the vector cannot
be recomputed (scrypt's cost makes guessing slow).

The salt is per dataset: ``KeyParams`` (salt and scrypt cost, never the passphrase) is written
beside the de-identified folder as ``password.json`` so that the folder can be recovered later
with the passphrase alone.  Passphrases are never written to disk, logs, configs or TensorBoard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from pathlib import Path

import numpy as np

from mema_jax.errors import InputError
from mema_jax.fileio import atomic_write_bytes

PASSWORD_DIM = 512
PARAMS_FILE = "password.json"
KDF = "scrypt"


class PasswordError(InputError):
    """A password parameters file that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class KeyParams:
    """The public half of a key: salt and scrypt cost (n = 2**log2_n, r, p)."""

    salt: bytes
    log2_n: int = 15
    r: int = 8
    p: int = 1
    dim: int = PASSWORD_DIM

    @classmethod
    def new(cls, **kw) -> KeyParams:
        return cls(salt=secrets.token_bytes(16), **kw)

    def to_json(self) -> dict:
        return {"kdf": KDF, "salt": self.salt.hex(), "log2_n": self.log2_n, "r": self.r, "p": self.p, "dim": self.dim}

    @classmethod
    def from_json(cls, d: dict, source: str = "password parameters") -> KeyParams:
        try:
            if d.get("kdf") != KDF:
                raise ValueError(f"kdf is {d.get('kdf')!r}, expected {KDF!r}")
            return cls(salt=bytes.fromhex(d["salt"]), log2_n=int(d["log2_n"]), r=int(d["r"]), p=int(d["p"]),
                       dim=int(d["dim"]))
        except (KeyError, ValueError, TypeError) as e:
            raise PasswordError(f"{source}: not a password parameters file ({e})") from None

    def save(self, folder) -> Path:
        path = Path(folder) / PARAMS_FILE
        atomic_write_bytes(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, folder_or_file) -> KeyParams:
        path = Path(folder_or_file)
        path = path if path.suffix == ".json" else path / PARAMS_FILE
        try:
            return cls.from_json(json.loads(path.read_text()), str(path))
        except FileNotFoundError:
            raise PasswordError(f"{path}: missing; it holds the salt the passphrase was stretched with") from None
        except json.JSONDecodeError as e:
            raise PasswordError(f"{path}: not JSON ({e})") from None


@dataclasses.dataclass(frozen=True)
class Secrets:
    """What a passphrase gives: the password vector of the networks and the key that seals the
    stored features (``deid_jax.payload``)."""

    vector: np.ndarray
    payload_key: bytes


def derive(passphrase: str, params: KeyParams) -> Secrets:
    """One scrypt(passphrase, salt) of 64 bytes: the first 32 seed the password vector (a standard
    normal draw; scrypt's output is a PBKDF2 stream, so they are the 32-byte derivation earlier
    folders were made with), the last 32 are the AES-256 key of the stored features."""
    if not passphrase:
        raise PasswordError("the passphrase is empty")
    stream = hashlib.scrypt(passphrase.encode("utf-8"), salt=params.salt, n=2**params.log2_n, r=params.r, p=params.p,
                            dklen=64, maxmem=256 * 2**20)
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(stream[:32], "little")))
    return Secrets(rng.standard_normal(params.dim).astype(np.float32), stream[32:])


def password_vector(passphrase: str, params: KeyParams) -> np.ndarray:
    """(dim,) float32: the password vector of ``derive``."""
    return derive(passphrase, params).vector


def random_passwords(rng, batch: int, dim: int = PASSWORD_DIM):
    """(batch, dim) standard normal vectors from a jax key (training)."""
    import jax

    return jax.random.normal(rng, (batch, dim))


def read_passphrase(*, env: str | None = None, file: str | None = None, prompt: str = "passphrase: ",
                    confirm: bool = False) -> str:
    """The passphrase from an environment variable, a file (first line), or typed at a prompt
    (not echoed).  Never from the command line itself, where ``ps`` and shell history would show it."""
    if env:
        value = os.environ.get(env)
        if not value:
            raise PasswordError(f"environment variable {env} is not set or empty")
        return value
    if file:
        try:
            value = Path(file).read_text().splitlines()[0] if Path(file).read_text() else ""
        except OSError as e:
            raise PasswordError(f"{file}: cannot read the passphrase file ({e.strerror})") from None
        if not value:
            raise PasswordError(f"{file}: the passphrase file is empty")
        return value
    import getpass

    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != value:
        raise PasswordError("the two passphrases differ")
    return value
