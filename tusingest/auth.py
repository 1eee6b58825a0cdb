"""Who is calling and what they may do: JWT Bearer verification, the caller's Identity, ownership rules.

Tokens are ArtStore's (claims sub, type, role, name, jti, iat, exp, nbf). The verification key
comes from PEM public key files (several for rotation, re-read when a file changes), a JWKS
document (URL or file, cached, re-fetched on an unknown ``kid`` at a bounded rate) or, for
development only, an HS256 secret. The algorithm a key verifies is fixed by the key's type and
never taken from the token, so ``alg: none`` and algorithm confusion (HS256 signed with the RSA
public key) find no key. Every refusal is an AuthError whose text is safe to show: it never
carries the token. This module reads no settings object; app.py hands it an AuthSettings.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    # Imported where keys are read and tokens verified: a server with no key (anonymous, loopback only)
    # loads neither PyJWT nor cryptography (~9 MiB); only a JWKS URL needs an HTTP client.
    import aiohttp
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

log = logging.getLogger(__name__)

REALM: Final = "artstore"
RS256: Final = "RS256"
ES256: Final = "ES256"
HS256: Final = "HS256"
# The only algorithms a token may name; anything else (none, HS384, PS256, ...) finds no key.
ACCEPTED_ALGORITHMS: Final = frozenset({RS256, ES256, HS256})
MIN_RSA_BITS: Final = 2048
MIN_SECRET_BYTES: Final = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash

type VerificationKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | bytes
type Clock = Callable[[], float]
type IdentityKind = Literal["service_account", "admin_user", "anonymous"]


# --- settings and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class AuthSettings:
    """What auth needs, cut from the settings by app.py. No key source at all means anonymous."""

    public_key_paths: tuple[Path, ...] = ()
    jwks_url: str | None = None  # http(s) URL or a file path
    secret: str | None = field(default=None, repr=False)  # HS256, development only
    issuer: str | None = None
    audience: str | None = None
    leeway_seconds: float = 30.0
    key_check_interval_seconds: float = 1.0  # key files are stat()ed at most this often
    jwks_cache_seconds: float = 300.0  # a fetched key set is trusted this long
    jwks_refetch_min_seconds: float = 30.0  # unknown kids re-fetch the set at most this often
    jwks_timeout_seconds: float = 5.0
    tls_min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    jwks_ca_bundle: str | None = None  # a private CA for an https JWKS; the system's CAs otherwise
    anonymous_name: str = "anonymous"

    @property
    def enabled(self) -> bool:
        return bool(self.public_key_paths or self.jwks_url or self.secret)


@dataclass(frozen=True)
class Identity:
    """The authenticated caller. ``subject`` is the owner recorded on uploads and files."""

    subject: str
    kind: IdentityKind
    role: str | None
    name: str
    scopes: frozenset[str] = frozenset()
    token_id: str | None = None


class AuthError(Exception):
    """A request that is refused with 401. ``reason`` is safe to show; ``missing`` means no token was sent."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


class AuthUnavailable(Exception):
    """The key set cannot be had right now (JWKS endpoint down, no cached keys): a 503, not the caller's fault."""

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class AuthConfigError(Exception):
    """The configured keys cannot be used at all; raised at start-up so the service does not run half-secured."""


# --- the 401 answer ---------------------------------------------------------------------------

_UNSAFE_IN_QUOTED: Final = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")  # RFC 6750 3: error_description


def www_authenticate(error: AuthError | None = None, *, realm: str = REALM) -> str:
    """The WWW-Authenticate value for a 401: no error code when no token was sent (RFC 6750 3.1)."""
    if error is None or error.missing:
        return f'Bearer realm="{realm}"'
    description = _UNSAFE_IN_QUOTED.sub("?", error.reason)
    return f'Bearer realm="{realm}", error="invalid_token", error_description="{description}"'


def www_authenticate_insufficient_scope(operation: Operation, *, realm: str = REALM) -> str:
    """The WWW-Authenticate value for a 403: the token is good but does not grant ``operation``."""
    scope = OPERATION_SCOPE.get(operation)
    scope_part = f', scope="{scope}"' if scope else ""
    return f'Bearer realm="{realm}", error="insufficient_scope"{scope_part}'


# --- authorization policy ---------------------------------------------------------------------


class Operation(enum.StrEnum):
    CREATE = "create"
    APPEND = "append"
    READ = "read"
    TERMINATE = "terminate"
    DELETE = "delete"
    TRANSFER = "transfer"
    AUDIT = "audit"
    METRICS = "metrics"  # GET /metrics


class Role(enum.StrEnum):
    ADMIN = "ADMIN"
    USER = "USER"
    AUDITOR = "AUDITOR"
    READONLY = "READONLY"


ROLE_OPERATIONS: Final[Mapping[Role, frozenset[Operation]]] = {
    Role.ADMIN: frozenset(Operation),
    # Terminating one's own unfinished upload is part of writing it.
    Role.USER: frozenset({Operation.CREATE, Operation.APPEND, Operation.READ, Operation.TERMINATE, Operation.DELETE}),
    Role.AUDITOR: frozenset({Operation.READ, Operation.AUDIT, Operation.METRICS}),
    Role.READONLY: frozenset({Operation.READ}),
}
# A role we do not know (a typo, a role added upstream later) gets what the weakest role gets.
LEAST_PRIVILEGE: Final = ROLE_OPERATIONS[Role.READONLY]

SCOPE_OPERATIONS: Final[Mapping[str, frozenset[Operation]]] = {
    "files:write": frozenset({Operation.CREATE, Operation.APPEND, Operation.TERMINATE}),
    "files:read": frozenset({Operation.READ}),
    "files:delete": frozenset({Operation.DELETE}),
    "files:transfer": frozenset({Operation.TRANSFER}),
    "metrics:read": frozenset({Operation.METRICS}),
}
OPERATION_SCOPE: Final[Mapping[Operation, str]] = {
    operation: scope for scope, operations in SCOPE_OPERATIONS.items() for operation in operations
}

ANONYMOUS_SUBJECT: Final = "anonymous"


IDENTITY_STATE: Final = "identity"  # where app.py's authentication keeps the caller's Identity in the request state
# No Identity in the request state (a route the authentication did not guard): no rights, owns nothing.
NOBODY: Final = Identity(subject="", kind="anonymous", role=None, name="")


def identity_in(state: Mapping[str, object]) -> Identity:
    """The caller's Identity from an ASGI scope's ``state``, or NOBODY."""
    found = state.get(IDENTITY_STATE)
    return found if isinstance(found, Identity) else NOBODY


def anonymous_identity(name: str = ANONYMOUS_SUBJECT) -> Identity:
    """The caller when no key is configured: only ever served on loopback (see refuse_unauthenticated_bind)."""
    return Identity(subject=ANONYMOUS_SUBJECT, kind="anonymous", role=Role.ADMIN.value, name=name)


def _role(identity: Identity) -> Role | None:
    try:
        return Role(identity.role) if identity.role is not None else None
    except ValueError:
        return None


def allowed_operations(identity: Identity) -> frozenset[Operation]:
    """The operations a caller may do: its role's (least privilege if unknown) plus its scopes'."""
    role = _role(identity)
    granted = ROLE_OPERATIONS[role] if role is not None else LEAST_PRIVILEGE
    for scope in identity.scopes:
        granted |= SCOPE_OPERATIONS.get(scope, frozenset())
    return granted


def may(identity: Identity, operation: Operation) -> bool:
    return operation in allowed_operations(identity)


def is_admin(identity: Identity) -> bool:
    return _role(identity) is Role.ADMIN


def is_owner_or_admin(identity: Identity, owner_subject: str | None) -> bool:
    """Whether the caller may touch what ``owner_subject`` owns (None: made before owners existed; admin only)."""
    if is_admin(identity):
        return True
    return owner_subject is not None and owner_subject == identity.subject


# --- secure defaults --------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether a bind address only takes connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_unauthenticated_bind(host: str, settings: AuthSettings, *, insecure_no_auth: bool) -> str | None:
    """Why ``serve`` must not start (no key, not loopback, no --insecure-no-auth), or None when it may."""
    if settings.enabled or is_loopback(host) or insecure_no_auth:
        return None
    return (
        f"refusing to serve on {host} without authentication: set JWT_PUBLIC_KEY_PATH or JWT_JWKS_URL, "
        "bind to 127.0.0.1, or pass --insecure-no-auth"
    )


# --- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One verification key and the one algorithm it verifies."""

    algorithm: str
    key: VerificationKey = field(repr=False)
    kid: str | None = None


def _key_of(public_key: object, where: str, kid: str | None = None) -> Key:
    """The Key for a public key: RSA verifies RS256 only, P-256 ES256 only; anything else is refused."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise AuthConfigError(f"{where}: RSA key of {public_key.key_size} bits; at least {MIN_RSA_BITS} needed")
        return Key(RS256, public_key, kid)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise AuthConfigError(f"{where}: EC key on {public_key.curve.name}; only P-256 (ES256) is accepted")
        return Key(ES256, public_key, kid)
    raise AuthConfigError(f"{where}: not an RSA or EC public key")


_PEM_BLOCK: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)


def load_pem_keys(data: bytes, where: str) -> list[Key]:
    """Every public key (or certificate's key) in a PEM text; a file may hold several for rotation."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    keys: list[Key] = []
    for block in _PEM_BLOCK.finditer(data):
        label, text = block.group(1), block.group(0)
        try:
            if label == b"CERTIFICATE":
                public_key: object = x509.load_pem_x509_certificate(text).public_key()
            elif label in (b"PUBLIC KEY", b"RSA PUBLIC KEY"):
                public_key = serialization.load_pem_public_key(text)
            else:
                raise AuthConfigError(
                    f"{where}: holds a {label.decode()}; only public keys or certificates belong here"
                )
        except ValueError as exc:
            raise AuthConfigError(f"{where}: unreadable PEM block ({exc.__class__.__name__})") from None
        keys.append(_key_of(public_key, where))
    if not keys:
        raise AuthConfigError(f"{where}: no PEM public key in it")
    return keys


def key_from_jwk(jwk: Mapping[str, Any]) -> Key | None:
    """A JWK as a Key, or None for one we never verify with (symmetric, other curves, encryption keys)."""
    import jwt
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    kty, use = jwk.get("kty"), jwk.get("use", "sig")
    if use != "sig":
        return None
    try:
        if kty == "RSA":
            public: object = RSAAlgorithm.from_jwk(dict(jwk))
        elif kty == "EC" and jwk.get("crv") == "P-256":
            public = ECAlgorithm.from_jwk(dict(jwk))
        else:
            return None
        kid = jwk.get("kid")
        # A private key published by mistake is not a public key: _key_of refuses it too.
        key = _key_of(public, "JWKS", kid if isinstance(kid, str) else None)
    except (jwt.InvalidKeyError, AuthConfigError, ValueError, KeyError, TypeError):
        log.warning("JWKS key %r ignored: not a usable RSA (>= 2048 bits) or P-256 public key", jwk.get("kid"))
        return None
    declared = jwk.get("alg")
    if declared is not None and declared != key.algorithm:
        return None  # the key says it is for something else: do not guess
    return key


def _file_signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


class PemKeyFiles:
    """Keys from PEM files, re-read when a file's mtime or size changes, looked at most once per interval.

    A file that disappears takes its keys with it (that is how an old key is retired); a file that
    cannot be parsed right now (being rewritten) keeps its previous keys until it reads well.
    """

    def __init__(self, paths: Iterable[Path], *, check_interval: float = 1.0, clock: Clock = time.monotonic) -> None:
        self._paths = tuple(paths)
        self._check_interval = check_interval
        self._clock = clock
        self._signatures: dict[Path, tuple[int, int] | None] = {}
        self._keys_by_file: dict[Path, list[Key]] = {}
        self._checked_at = clock()
        for path in self._paths:  # at start every file must be there and usable
            signature = _file_signature(path)
            if signature is None:
                raise AuthConfigError(f"JWT_PUBLIC_KEY_PATH: {path} cannot be read")
            self._keys_by_file[path] = load_pem_keys(path.read_bytes(), f"JWT_PUBLIC_KEY_PATH {path}")
            self._signatures[path] = signature

    def keys(self) -> list[Key]:
        now = self._clock()
        if now - self._checked_at >= self._check_interval:
            self._checked_at = now
            self._refresh()
        return [key for path in self._paths for key in self._keys_by_file.get(path, [])]

    def _refresh(self) -> None:
        for path in self._paths:
            signature = _file_signature(path)
            if signature == self._signatures.get(path):
                continue
            if signature is None:
                log.warning("JWT key file %s is gone; its keys are no longer accepted", path)
                self._keys_by_file.pop(path, None)
                self._signatures[path] = None
                continue
            try:
                keys = load_pem_keys(path.read_bytes(), f"JWT key file {path}")
            except (OSError, AuthConfigError) as exc:
                log.warning("JWT key file %s changed but cannot be used yet (%s); keeping its previous keys", path, exc)
                continue  # signature not recorded: tried again at the next check
            self._keys_by_file[path] = keys
            self._signatures[path] = signature
            log.info("JWT key file %s reloaded: %d key(s)", path, len(keys))


class JwksKeySet:
    """Keys from a JWKS document (http(s) URL or file), cached; an unknown kid re-fetches at a bounded rate."""

    def __init__(
        self,
        source: str,
        *,
        cache_seconds: float = 300.0,
        refetch_min_seconds: float = 30.0,
        timeout_seconds: float = 5.0,
        tls_min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
        ca_bundle: str | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._source = source
        self._ca_bundle = ca_bundle
        self._is_url = source.startswith(("http://", "https://"))
        self._cache_seconds = cache_seconds
        self._refetch_min_seconds = refetch_min_seconds
        self._timeout_seconds = timeout_seconds
        self._tls_min_version = tls_min_version
        self._clock = clock
        self._keys: list[Key] = []
        self._fetched_at: float | None = None  # last successful fetch
        self._tried_at: float | None = None  # last attempt, successful or not
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0  # attempts made, for tests and metrics

    async def keys(self, kid: str | None) -> list[Key]:
        """The keys that may verify a token naming ``kid`` (all of them when it names none)."""
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self._cache_seconds
        if stale or (kid is not None and not self._match(kid)):
            await self._refresh_if_allowed()
        if self._fetched_at is None:
            raise AuthUnavailable("the signing key set cannot be fetched right now")
        return self._match(kid) if kid is not None else list(self._keys)

    def _match(self, kid: str) -> list[Key]:
        return [key for key in self._keys if key.kid == kid]

    async def _refresh_if_allowed(self) -> None:
        async with self._lock:  # one fetch at a time; the others wait for its result
            now = self._clock()
            if self._tried_at is not None and now - self._tried_at < self._refetch_min_seconds:
                return  # a flood of made-up kids must not turn into a flood of fetches
            self._tried_at = now
            self.fetches += 1
            from aiohttp import ClientError

            try:
                document = await self._fetch()
                keys = [key for jwk in _jwk_list(document) if (key := key_from_jwk(jwk)) is not None]
            except (OSError, ClientError, TimeoutError, ValueError) as exc:
                log.warning(
                    "JWKS %s could not be fetched (%s); keeping %d cached key(s)", self._source, exc, len(self._keys)
                )
                return
            self._keys = keys
            self._fetched_at = now

    async def _fetch(self) -> object:
        if not self._is_url:
            return json.loads(await asyncio.to_thread(Path(self._source).read_bytes))
        if self._session is None:
            import aiohttp

            tls = ssl.create_default_context(cafile=self._ca_bundle)
            tls.minimum_version = self._tls_min_version
            timeout = aiohttp.ClientTimeout(total=self._timeout_seconds)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=tls))
        async with self._session.get(self._source, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            body = await response.read()
            if len(body) > 1 << 20:
                raise ValueError("JWKS document larger than 1 MiB")
            return json.loads(body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _jwk_list(document: object) -> list[Mapping[str, Any]]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    return [jwk for jwk in document["keys"] if isinstance(jwk, dict)]


# --- verification -----------------------------------------------------------------------------

_KINDS: Final = frozenset({"service_account", "admin_user"})
# PyJWT's own messages are not shown (they are not guaranteed free of token content); ours are.
_REFUSALS: Final = (  # PyJWT's exception classes by name: jwt is imported only once a token is checked
    ("ExpiredSignatureError", "the token has expired"),
    ("ImmatureSignatureError", "the token is not valid yet"),
    ("InvalidIssuerError", "the token's issuer is not accepted"),
    ("InvalidAudienceError", "the token's audience is not accepted"),
    ("InvalidSignatureError", "the token's signature does not verify"),
    ("DecodeError", "the token is malformed"),
)


def _refusal(exc: jwt.PyJWTError) -> AuthError:
    import jwt

    if isinstance(exc, jwt.MissingRequiredClaimError):
        return AuthError(f"the token lacks the {exc.claim} claim")  # one of the names we require: safe
    for kind, reason in _REFUSALS:
        if isinstance(exc, getattr(jwt, kind)):
            return AuthError(reason)
    return AuthError("the token is not valid")


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer ...`` header; a missing one (or another scheme) is ``missing``."""
    if authorization is None or not authorization.strip():
        raise AuthError("a Bearer token is required", missing=True)
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("a Bearer token is required", missing=True)
    token = credentials.strip()
    if not token or any(c.isspace() for c in token):
        raise AuthError("the Authorization header is malformed")
    return token


class Authenticator:
    """Turns an Authorization header into an Identity, or refuses it with an AuthError."""

    def __init__(self, settings: AuthSettings, *, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self._pem = (
            PemKeyFiles(settings.public_key_paths, check_interval=settings.key_check_interval_seconds, clock=clock)
            if settings.public_key_paths
            else None
        )
        self._jwks = (
            JwksKeySet(
                settings.jwks_url,
                cache_seconds=settings.jwks_cache_seconds,
                refetch_min_seconds=settings.jwks_refetch_min_seconds,
                timeout_seconds=settings.jwks_timeout_seconds,
                tls_min_version=settings.tls_min_version,
                ca_bundle=settings.jwks_ca_bundle,
                clock=clock,
            )
            if settings.jwks_url
            else None
        )
        self._secret_key = Key(HS256, settings.secret.encode()) if settings.secret else None
        if self._secret_key is not None:
            log.warning("JWT_SECRET is set: HS256 tokens are accepted; this is for development only")
        if not settings.enabled:
            log.warning("no JWT key configured: every request is served as %r (loopback only)", settings.anonymous_name)

    @property
    def jwks(self) -> JwksKeySet | None:
        return self._jwks

    async def authenticate(self, authorization: str | None) -> Identity:
        if not self.settings.enabled:
            return anonymous_identity(self.settings.anonymous_name)
        import jwt

        token = bearer_token(authorization)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("the token is malformed") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in ACCEPTED_ALGORITHMS:
            raise AuthError("the token's algorithm is not accepted")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("the token is malformed")
        known = await self._keys(kid)
        if not known and kid is not None:
            raise AuthError("the token's key id is not known")
        candidates = [key for key in known if key.algorithm == algorithm]
        if not candidates:
            raise AuthError("no accepted key matches the token")
        return self._verify(token, candidates)

    async def _keys(self, kid: str | None) -> list[Key]:
        keys: list[Key] = []
        if self._secret_key is not None:
            keys.append(self._secret_key)
        if self._pem is not None:
            keys.extend(self._pem.keys())
        if self._jwks is not None:
            try:
                keys.extend(await self._jwks.keys(kid))
            except AuthUnavailable:
                if not keys:
                    raise
        return keys

    def _verify(self, token: str, candidates: list[Key]) -> Identity:
        import jwt

        bad_signature: jwt.PyJWTError | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key=key.key,
                    algorithms=[key.algorithm],  # from the key, never from the token
                    issuer=self.settings.issuer,
                    audience=self.settings.audience,
                    leeway=self.settings.leeway_seconds,
                    options={"require": ["exp", "sub"], "verify_aud": self.settings.audience is not None},
                )
            except jwt.InvalidSignatureError as exc:
                bad_signature = exc  # rotation: another candidate may be the one that signed it
                continue
            except jwt.PyJWTError as exc:
                raise _refusal(exc) from None
            return identity_from_claims(claims)
        assert bad_signature is not None
        raise _refusal(bad_signature) from None

    async def aclose(self) -> None:
        if self._jwks is not None:
            await self._jwks.aclose()


def identity_from_claims(claims: Mapping[str, Any]) -> Identity:
    """ArtStore's claims as an Identity; a claim of the wrong shape refuses the token."""
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthError("the token lacks the sub claim")
    kind = claims.get("type", "service_account")
    if kind not in _KINDS:
        raise AuthError("the token's type is not service_account or admin_user")
    role = claims.get("role")
    if role is not None and not isinstance(role, str):
        raise AuthError("the token's role is not a string")
    name = claims.get("name")
    token_id = claims.get("jti")
    return Identity(
        subject=subject,
        kind=kind,
        role=role.upper() if role else None,
        name=name if isinstance(name, str) and name else subject,
        scopes=_scopes(claims),
        token_id=token_id if isinstance(token_id, str) else None,
    )


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes as OAuth writes them (``scope``: space-separated) or as lists (``scopes``, ``scp``)."""
    found: set[str] = set()
    for name in ("scope", "scopes", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(item for item in value if isinstance(item, str))
    return frozenset(found)
