"""Who may sign what: Ed25519 keys with roles, validity dates and revocation.

Operators and guards hold private keys; so does each sidecar, with the narrow role
``sidecar`` (its ramp ``advance`` commands, its heartbeats and audit records). Every verifier
-- each sidecar, ``sidecar ctl``, the aggregator, the report -- holds only public keys, in a
*trust file* (TOML):

.. code-block:: toml

    [[keys]]
    id = "ops-alice-2026"
    role = "operator"                    # operator | guard | sidecar
    public_key = "base64 of the 32-byte Ed25519 public key"
    principal = "alice@example.com"      # issued_by of her commands must be this
    # actions = ["rollback", "pause"]    # narrower than the role allows (optional)
    not_before = "2026-01-01T00:00:00Z"  # optional
    not_after = "2027-01-01T00:00:00Z"   # optional: keep it as verify-only for old history
    # revoked_at = "2026-06-01T00:00:00Z"  # records appended from then on are refused

Validity is judged at the time the broker appended the record (see ``ControlRecord``), so a
replay of the control topic years later reaches the same verdicts, and a key revoked today
still verifies the history it signed before. A private key file holds one key:

.. code-block:: toml

    id = "ops-alice-2026"
    role = "operator"
    principal = "alice@example.com"
    private_key = "base64 of the 32-byte Ed25519 seed"

Neither ``repr`` nor any error message ever shows a private key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import ConfigError

Role = Literal["operator", "guard", "sidecar"]
ROLES: tuple[Role, ...] = get_args(Role)

#: What each role may sign. Operators may do everything; guards (the aggregator, the outcomes
#: stage) may only stop things and report verdicts; a sidecar may only advance a ramp whose
#: floors it saw met (and sign its own heartbeats and audit records).
ROLE_ACTIONS: dict[Role, frozenset[str]] = {
    "operator": frozenset(
        {
            "shadow",
            "canary",
            "ramp",
            "promote",
            "rollback",
            "pause",
            "resume",
            "retire",
            "advance",
            "verdict",
            "deprecate",
            "sunset",
        }
    ),
    "guard": frozenset({"rollback", "pause", "verdict"}),
    "sidecar": frozenset({"advance"}),
}
#: Roles whose keys may sign instance records (heartbeats, audit records).
INSTANCE_ROLES: frozenset[Role] = frozenset({"sidecar"})

_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SIGNATURE_RE = re.compile(r"^[A-Za-z0-9_-]{86}$")

KeyId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class TrustError(ConfigError):
    """A key or trust file is unusable; the message names the file and never a secret."""


class TrustedKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One public key of the trust file."""

    id: KeyId
    role: Role
    public_key: str
    #: Who holds the key: ``issued_by`` of every command it signs must equal this (the key
    #: id when unset), so the audit names the holder and nobody can sign in another's name.
    principal: str | None = None
    #: Narrower than the role's actions (never wider).
    actions: list[str] | None = None
    not_before: str | None = None
    not_after: str | None = None
    revoked_at: str | None = None

    @property
    def holder(self) -> str:
        """The ``issued_by`` this key's commands must carry."""
        return self.principal or self.id


class _TrustFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    keys: list[TrustedKey] = []


class _KeyFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: KeyId
    role: Role
    private_key: str
    principal: str | None = None


class Refusal(Exception):
    """Why a signature does not authorise a record; ``code`` is the audit reason."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def parse_time(text: str, *, what: str) -> int:
    """ISO-8601 (naive means UTC) -> epoch milliseconds; ValueError says the form."""
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected ISO-8601, e.g. 2026-01-31T00:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _b64decode(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64") from None
    if len(raw) != size:
        raise ValueError(f"{what} is {len(raw)} bytes; an Ed25519 key is {size}")
    return raw


def encode_signature(signature: bytes) -> str:
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")


def decode_signature(text: str) -> bytes | None:
    """The 64 signature bytes, or None when ``text`` is not an unpadded base64url string."""
    if not _SIGNATURE_RE.match(text):
        return None
    return base64.urlsafe_b64decode(text + "==")


@dataclass(frozen=True, slots=True)
class _Entry:
    key: TrustedKey
    public: Ed25519PublicKey
    actions: frozenset[str]
    not_before_ms: int | None
    not_after_ms: int | None
    revoked_ms: int | None


class TrustStore:
    """Public keys by id, with what each may sign and when."""

    __slots__ = ("_entries",)

    def __init__(self, keys: Iterable[TrustedKey] = (), *, source: str = "trust") -> None:
        entries: dict[str, _Entry] = {}
        for key in keys:
            if key.id in entries:
                raise TrustError(f"{source}: key id {key.id!r} is listed twice")
            where = f"{source}: key {key.id!r}"
            try:
                public = Ed25519PublicKey.from_public_bytes(
                    _b64decode(key.public_key, 32, f"{where} public_key")
                )
                dates = [
                    None if t is None else parse_time(t, what=f"{where} {name}")
                    for name, t in (
                        ("not_before", key.not_before),
                        ("not_after", key.not_after),
                        ("revoked_at", key.revoked_at),
                    )
                ]
            except ValueError as exc:
                raise TrustError(str(exc)) from None
            allowed = ROLE_ACTIONS[key.role]
            if key.actions is not None:
                wider = set(key.actions) - allowed
                if wider:
                    raise TrustError(
                        f"{where}: actions {sorted(wider)} are not allowed to role {key.role} "
                        f"(it may sign {sorted(allowed)})"
                    )
                allowed = frozenset(key.actions)
            entries[key.id] = _Entry(key, public, allowed, *dates)
        self._entries = entries

    def __repr__(self) -> str:
        return f"TrustStore(keys={sorted(self._entries)!r})"

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._entries

    def key(self, key_id: str) -> TrustedKey | None:
        entry = self._entries.get(key_id)
        return None if entry is None else entry.key

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    @classmethod
    def parse(cls, text: str, *, source: str = "trust file") -> TrustStore:
        try:
            doc = tomllib.loads(text)
            trust = msgspec.convert(doc, _TrustFile)
        except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
            raise TrustError(f"{source}: {exc}") from None
        return cls(trust.keys, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TrustStore:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TrustError(f"cannot read trust file {str(path)!r}: {exc.strerror}") from None
        return cls.parse(text, source=str(path))

    def check(
        self,
        key_id: str | None,
        signature: str | None,
        message: bytes,
        at_ms: int,
        action: str | None,
    ) -> TrustedKey:
        """The key that signed ``message`` for ``action`` (None: no action, e.g. an instance
        record) at ``at_ms``; :class:`Refusal` otherwise (``unsigned``, ``unknown_key``,
        ``bad_signature``, ``key_not_yet_valid``, ``key_expired``, ``key_revoked``,
        ``role``)."""
        if not key_id or not signature:
            raise Refusal("unsigned", "no key_id/signature")
        entry = self._entries.get(key_id)
        if entry is None:
            raise Refusal("unknown_key", f"key id {key_id!r} is not in the trust file")
        raw = decode_signature(signature)
        if raw is None:
            raise Refusal("bad_signature", "signature is not 86 characters of base64url")
        try:
            entry.public.verify(raw, message)
        except InvalidSignature:
            raise Refusal("bad_signature", f"signature does not match key {key_id!r}") from None
        if entry.not_before_ms is not None and at_ms < entry.not_before_ms:
            raise Refusal(
                "key_not_yet_valid", f"key {key_id!r} is valid from {entry.key.not_before}"
            )
        if entry.revoked_ms is not None and at_ms >= entry.revoked_ms:
            raise Refusal("key_revoked", f"key {key_id!r} was revoked at {entry.key.revoked_at}")
        if entry.not_after_ms is not None and at_ms >= entry.not_after_ms:
            raise Refusal("key_expired", f"key {key_id!r} expired at {entry.key.not_after}")
        if action is not None and action not in entry.actions:
            raise Refusal(
                "role",
                f"key {key_id!r} (role {entry.key.role}) may not sign {action}; it may sign "
                f"{', '.join(sorted(entry.actions)) or 'nothing'}",
            )
        return entry.key


class SigningKey:
    """One private key: signs commands (and, for role ``sidecar``, instance records)."""

    __slots__ = ("_private", "id", "principal", "role")

    def __init__(
        self, key_id: str, role: Role, private: Ed25519PrivateKey, principal: str | None = None
    ) -> None:
        if not _KEY_ID_RE.match(key_id):
            raise TrustError(f"invalid key id {key_id!r}: use [A-Za-z0-9_.-]{{1,64}}")
        self.id = key_id
        self.role = role
        self.principal = principal
        self._private = private

    def __repr__(self) -> str:
        return f"SigningKey(id={self.id!r}, role={self.role!r})"

    @property
    def holder(self) -> str:
        """The ``issued_by`` of what this key signs (its principal, else its id)."""
        return self.principal or self.id

    __str__ = __repr__

    @classmethod
    def generate(cls, key_id: str, role: Role, principal: str | None = None) -> SigningKey:
        return cls(key_id, role, Ed25519PrivateKey.generate(), principal)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SigningKey:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TrustError(f"cannot read key file {source!r}: {exc.strerror}") from None
        try:
            doc = msgspec.convert(tomllib.loads(text), _KeyFile)
            seed = _b64decode(doc.private_key, 32, f"{source}: private_key")
        except (tomllib.TOMLDecodeError, msgspec.ValidationError, ValueError) as exc:
            # msgspec's message names the field, never its value.
            raise TrustError(f"{source}: not a sidecar key file ({type(exc).__name__})") from None
        return cls(doc.id, doc.role, Ed25519PrivateKey.from_private_bytes(seed), doc.principal)

    def sign(self, message: bytes) -> str:
        return encode_signature(self._private.sign(message))

    def public_key(self) -> str:
        raw = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    def trusted(self, **dates: str | None) -> TrustedKey:
        """This key's trust-file entry (``not_before``/``not_after`` optional)."""
        return TrustedKey(
            id=self.id,
            role=self.role,
            public_key=self.public_key(),
            principal=self.principal,
            not_before=dates.get("not_before"),
            not_after=dates.get("not_after"),
        )

    def key_file_text(self) -> str:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        seed = self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        lines = [
            "# sidecar signing key: private, keep it readable by its owner only (chmod 600)",
            f"id = {_toml(self.id)}",
            f"role = {_toml(self.role)}",
        ]
        if self.principal:
            lines.append(f"principal = {_toml(self.principal)}")
        lines.append(f"private_key = {_toml(base64.b64encode(seed).decode('ascii'))}")
        return "\n".join(lines) + "\n"


def trust_entry_text(key: TrustedKey) -> str:
    """``key`` as a ``[[keys]]`` table of a trust file."""
    lines = ["[[keys]]"]
    for field in key.__struct_fields__:
        value: Any = getattr(key, field)
        if value is not None:
            lines.append(f"{field} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    return msgspec.json.encode(value).decode()  # a JSON string or list is valid TOML


def write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only; never overwrite an existing key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


@dataclass(frozen=True, slots=True)
class KeySet:
    """A trust file and one private key file per role (``write_key_set``)."""

    trust_file: Path
    operator: Path
    guard: Path
    sidecar: Path


def write_key_set(directory: Path, prefix: str = "dev") -> KeySet:
    """A fresh trust file and one private key per role in ``directory``: for demos, tests and
    a first try. Production keys are made one by one with ``sidecar ctl keygen``, each by the
    person or service that will hold it."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    entries = []
    for role in ROLES:
        key = SigningKey.generate(f"{prefix}-{role}", role, f"{prefix}-{role}")
        path = directory / f"{prefix}-{role}.key"
        write_private(path, key.key_file_text())
        paths[role] = path
        entries.append(trust_entry_text(key.trusted()))
    trust_file = directory / "trust.toml"
    trust_file.write_text("\n".join(entries), encoding="utf-8")
    return KeySet(trust_file, paths["operator"], paths["guard"], paths["sidecar"])
