"""Secrets at rest: webhook secrets sign deliveries, so they cannot be hashed; they are kept sealed instead.

``open_secret_box(url)`` picks the box:

- ``file:///relative/path`` or ``file:////absolute/path`` (SQLAlchemy's slashes, as for ``sqlite://``): AES-256-GCM
  under a 32-byte key file. The file is made on first use, readable by its owner only (mode 0600, in a
  directory made 0700), and published complete in one step, so no other user and no concurrent process ever
  reads it half-written. A key file that group or others may read is refused: whoever can read it can open
  every secret. No query parameters.
- ``kms://<key id, ARN or alias/name>?region=<region>``: envelope encryption. Each seal asks KMS for a fresh
  data key (GenerateDataKey, AES-256) and keeps its encrypted copy in the sealed string; opening decrypts that
  copy with KMS once and keeps the plaintext data key in memory for the life of the box, so reads cost no KMS
  call after the first. The master key never leaves KMS. Needs boto3 (``pip install 'sdasync[aws]'``).

Sealed strings are versioned and say which kind of box made them: ``v1:file:<nonce+ciphertext>`` and
``v1:kms:<encrypted data key>:<nonce+ciphertext>``, each part URL-safe base64 without padding. The GCM tag
authenticates the ciphertext and the header before it, so an altered string, or one sealed under another key,
does not open (ConfigError, since a changed master key is the likely cause).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sdasync.errors import ConfigError
from sdasync.urls import path_from_url, query_params

VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
#: Plaintext data keys a KMS box keeps (one per seal it opened): far more than sdasync's tenants need.
_KMS_CACHE_MAX = 4096
_ENCRYPTION_CONTEXT = {"purpose": "sdasync-secretbox"}


@runtime_checkable
class SecretBox(Protocol):
    """Seals small secrets for storage and opens them again."""

    def seal(self, plaintext: bytes) -> str:
        """A printable, versioned string holding ``plaintext`` encrypted and authenticated. Raises ConfigError
        (an unusable key), BackendError (KMS unreachable)."""
        ...

    def open(self, sealed: str) -> bytes:
        """The plaintext ``seal`` returned ``sealed`` for. Raises ConfigError when it does not open (altered, or
        sealed under another key or by another kind of box), BackendError."""
        ...


def open_secret_box(url: str) -> SecretBox:
    """The box ``url`` names (see the module docstring). Opens nothing yet: the key file is made or read, and
    KMS reached, on first use. Raises ConfigError for a bad URL."""
    scheme = urlsplit(url).scheme
    if scheme == "file":
        query_params(url, {})
        return FileSecretBox(path_from_url(url))
    if scheme == "kms":
        params = query_params(url, {"region": str})
        key_id = url[len("kms://"):].split("?", 1)[0]
        if not key_id:
            raise ConfigError(f"{url!r} names no KMS key: use kms://<key id, ARN or alias/name>?region=<region>")
        return KmsSecretBox(key_id, region=params.get("region"))
    raise ConfigError(f"secrets URL {url!r}: the scheme must be file:// (a local key file) or kms:// (AWS KMS)")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("a sealed secret is not valid base64: it was altered") from exc


def _encrypt(key: bytes, plaintext: bytes, header: str) -> str:
    nonce = secrets.token_bytes(NONCE_BYTES)  # random 96-bit nonces: safe far beyond the seals sdasync makes
    return _b64(nonce + AESGCM(key).encrypt(nonce, plaintext, header.encode("ascii")))


def _decrypt(key: bytes, body: str, header: str) -> bytes:
    blob = _unb64(body)
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], header.encode("ascii"))
    except (InvalidTag, ValueError) as exc:
        raise ConfigError("a sealed secret does not open: it was altered, or sealed under another key (did the "
                          "secrets key file or KMS key change?)") from exc


def _split(sealed: str, kind: str, parts: int) -> list[str]:
    fields = sealed.split(":") if isinstance(sealed, str) else []
    if len(fields) != parts or fields[0] != VERSION or fields[1] != kind:
        got = ":".join(fields[:2]) if len(fields) >= 2 else "an unknown format"
        raise ConfigError(f"a sealed secret is {got!r}, not {VERSION}:{kind}: it was sealed by another kind of "
                          f"secrets box, or altered")
    return fields


class FileSecretBox:
    """AES-256-GCM under a local key file (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def seal(self, plaintext: bytes) -> str:
        header = f"{VERSION}:file"
        return f"{header}:{_encrypt(self._load(), plaintext, header)}"

    def open(self, sealed: str) -> bytes:
        fields = _split(sealed, "file", 3)
        return _decrypt(self._load(), fields[2], f"{VERSION}:file")

    def _load(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = self._read() if self.path.exists() else self._create()
            return self._key

    def _create(self) -> bytes:
        """Write a new key to a private temporary file, then link it into place: the link fails if another process
        got there first, and then its key (complete, since it too was linked only once written) is the one."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            # O_EXCL: never reuse a file someone else made; 0600 from the first instant, whatever the umask.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(secrets.token_bytes(KEY_BYTES))
                    out.flush()
                    os.fsync(out.fileno())
                with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
                    os.link(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the secrets key file {self.path}: {exc}") from exc
        return self._read()

    def _read(self) -> bytes:
        try:
            info = self.path.stat()
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"the secrets key file {self.path} is not a regular file")
            if info.st_mode & 0o077:
                raise ConfigError(f"the secrets key file {self.path} may be read by other users (mode "
                                  f"{stat.S_IMODE(info.st_mode):04o}); whoever reads it can open every webhook "
                                  f"secret. Fix it with: chmod 600 {self.path}")
            key = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the secrets key file {self.path}: {exc}") from exc
        if len(key) != KEY_BYTES:
            raise ConfigError(f"the secrets key file {self.path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key")
        return key


class KmsSecretBox:
    """Envelope encryption under a KMS key (see the module docstring). ``client``: a ready boto3 KMS client."""

    def __init__(self, key_id: str, *, region: str | None = None, client: Any = None) -> None:
        try:
            from sdasync.awsclient import LazyClient
        except ImportError as exc:  # boto3 missing
            raise ConfigError("kms:// needs boto3: pip install 'sdasync[aws]'") from exc
        self.key_id = key_id
        self._client = LazyClient("kms", region=region, client=client)
        self._data_keys: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def seal(self, plaintext: bytes) -> str:
        with _kms_errors(f"generate a data key under KMS key {self.key_id}"):
            answer = self._client.get().generate_data_key(KeyId=self.key_id, KeySpec="AES_256",
                                                          EncryptionContext=_ENCRYPTION_CONTEXT)
        data_key, encrypted = bytes(answer["Plaintext"]), bytes(answer["CiphertextBlob"])
        header = f"{VERSION}:kms:{_b64(encrypted)}"
        return f"{header}:{_encrypt(data_key, plaintext, header)}"

    def open(self, sealed: str) -> bytes:
        fields = _split(sealed, "kms", 4)
        encrypted = _unb64(fields[2])
        return _decrypt(self._data_key(encrypted), fields[3], ":".join(fields[:3]))

    def close(self) -> None:
        self._client.close()

    def _data_key(self, encrypted: bytes) -> bytes:
        with self._lock:
            cached = self._data_keys.get(encrypted)
        if cached is not None:
            return cached
        with _kms_errors("decrypt a data key with KMS"):
            answer = self._client.get().decrypt(CiphertextBlob=encrypted, EncryptionContext=_ENCRYPTION_CONTEXT)
        data_key = bytes(answer["Plaintext"])
        with self._lock:
            if len(self._data_keys) >= _KMS_CACHE_MAX:
                self._data_keys.clear()  # far beyond any real use: start over rather than grow without bound
            self._data_keys[encrypted] = data_key
        return data_key


#: KMS's refusals of a key or a ciphertext: no retry helps, the configuration (or the sealed string) is wrong.
_KMS_CONFIG_CODES = frozenset({"InvalidCiphertextException", "NotFoundException", "DisabledException",
                               "KMSInvalidStateException", "InvalidKeyUsageException", "IncorrectKeyException"})


@contextmanager
def _kms_errors(action: str) -> Iterator[None]:
    """Translate botocore errors as every AWS backend does, KMS's refusals of a key or ciphertext as ConfigError."""
    from sdasync.awsclient import error_code, translate_errors

    with translate_errors(action):
        try:
            yield
        except Exception as exc:
            if error_code(exc) in _KMS_CONFIG_CODES:
                raise ConfigError(f"{action}: {error_code(exc)}: {exc}") from exc
            raise
