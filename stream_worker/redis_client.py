"""The one Redis client of lookout: how it is made, how its failures map to lookout's errors, and
the preflight that turns a Redis mistake into one line.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from stream_worker.errors import ConfigError, LookoutError, ServiceUnavailable
from stream_worker.hints import start_hint
from stream_worker.kafka import speaks_tls
from stream_worker.settings import RedisSettings, Settings, read_secret, redact_url

log = logging.getLogger("lookout.redis")


def redis_failure(exc: Exception) -> LookoutError:
    """Map a redis-py exception to lookout's tree: connection trouble is retriable."""
    if isinstance(
        exc, redis_errors.ConnectionError | redis_errors.TimeoutError | redis_errors.BusyLoadingError
    ):
        return ServiceUnavailable(f"Redis unavailable: {exc}")
    if isinstance(exc, redis_errors.AuthenticationError | redis_errors.NoPermissionError):
        return LookoutError(
            f"Redis refused lookout's credentials: {exc}; check REDIS_USERNAME/REDIS_PASSWORD_FILE"
        )
    if isinstance(exc, redis_errors.ReadOnlyError | redis_errors.TryAgainError):
        return ServiceUnavailable(f"Redis not writable right now: {exc}")
    return LookoutError(f"Redis error: {exc}")


def make_redis(settings: RedisSettings) -> aioredis.Redis:
    """A Redis client from the settings (ACL user, password file, TLS CA), with timeouts."""
    options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5, "health_check_interval": 15}
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password_file:
        options["password"] = read_secret(settings.redis_password_file, "the Redis password")
    if settings.redis_url.startswith("rediss://") and settings.redis_ca_file:
        options["ssl_ca_certs"] = settings.redis_ca_file
    return aioredis.from_url(settings.redis_url, **options)


async def check_redis(settings: Settings) -> None:
    """One-line error when Redis cannot be reached, refuses us, or forbids lookout's key prefix."""
    r = settings.redis
    where = f"Redis at {redact_url(r.redis_url).split('://', 1)[-1]}"
    client = make_redis(r)
    try:
        await client.ping()
        # An ACL user limited to other keys would pass PING and fail on the first batch; a read
        # under the prefix (GET of a key lookout never writes) asks the ACL now.
        await client.get(f"{r.key_prefix}:preflight")
    except redis_errors.AuthenticationError as exc:
        if not r.redis_password_file:
            raise ConfigError(
                f"{where} requires a login ({exc}): set REDIS_USERNAME and REDIS_PASSWORD_FILE "
                "(--redis-username, --redis-password-file)"
            ) from exc
        raise ConfigError(
            f"{where} refused user {r.redis_username or 'default'!r} ({exc}): check REDIS_USERNAME and "
            f"the password in {r.redis_password_file}"
        ) from exc
    except redis_errors.NoPermissionError as exc:
        raise ConfigError(
            f"{where}: user {r.redis_username or 'default'!r} may not use keys under '{r.key_prefix}:' "
            f"({exc}): set --key-prefix / LOOKOUT_KEY_PREFIX to the prefix its ACL allows, or widen the ACL"
        ) from exc
    except redis_errors.RedisError as exc:
        raise await _redis_connection_problem(settings, where, exc) from exc
    try:
        await _check_persistence(client, where)
    finally:
        await client.aclose()


async def _check_persistence(client: aioredis.Redis, where: str) -> None:
    """Refuse a Redis that may evict keys; warn when an acknowledged write may not survive a crash.

    Exactly-once counting keeps each partition's offset watermark in Redis: an evicted watermark
    (or count) silently changes the numbers, and ``volatile-*`` policies evict exactly the count
    keys, which have a TTL. A Redis whose ``CONFIG`` is not ours to read (managed services rename
    or forbid it) is trusted, with a warning.
    """
    try:
        config = await client.config_get("maxmemory-policy", "appendonly", "appendfsync")
    except redis_errors.RedisError as exc:
        log.warning("%s: cannot read its CONFIG (%s); make sure maxmemory-policy is noeviction", where, exc)
        return
    policy = str(config.get("maxmemory-policy", "noeviction"))
    if policy != "noeviction":
        raise ConfigError(
            f"{where} has maxmemory-policy {policy}: it may evict lookout's offset watermarks and "
            "counts, which breaks exactly-once counting: set maxmemory-policy noeviction "
            "(CONFIG SET maxmemory-policy noeviction, or in redis.conf)"
        )
    if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
        log.warning(
            "%s runs appendonly %s, appendfsync %s: a Redis crash may lose the last second of "
            "acknowledged counts (they are then replayed only up to the committed offsets); "
            "use appendonly yes and appendfsync always where counts must survive a crash",
            where,
            config.get("appendonly"),
            config.get("appendfsync"),
        )


async def _redis_connection_problem(settings: Settings, where: str, exc: BaseException) -> ConfigError:
    """Name the TLS mistake behind a failed Redis connection, or say it is unreachable."""
    r = settings.redis
    text = " ".join(str(exc).split())
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0].strip(" .")
        return ConfigError(
            f"{where}: the server's TLS certificate is not trusted ({reason}): set --redis-ca-file / "
            f"REDIS_CA_FILE to the CA that signed it (now {r.redis_ca_file or 'the system CAs'})"
        )
    if r.redis_url.startswith("redis://") and "refused" not in text.lower():
        host, port = _url_address(r.redis_url)
        if port and await speaks_tls(host, port, 5.0):
            return ConfigError(
                f"{where} expects TLS but --redis-url is redis://: use rediss:// and set --redis-ca-file"
            )
    return ConfigError(
        f"cannot reach {where} ({exc.__class__.__name__}): " + start_hint("Redis", "--redis-url / REDIS_URL")
    )


def _url_address(url: str) -> tuple[str, int]:
    """Host and port of a redis:// URL (0 when the URL names no port)."""
    hostport = url.split("://", 1)[-1].rpartition("@")[2].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else (hostport, 0)
