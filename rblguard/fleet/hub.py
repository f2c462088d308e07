"""The fleet's Redis commands: one stream of bans, one snapshot of the active ones.

Keys, under the fleet's ``prefix`` (several fleets may share one Redis):

- ``PREFIX bans``: a stream, one entry per ban a member decided from its own log
  (rblguard.fleet.entries has its fields).  Every XADD trims it by MINID to the
  longest ban a member accepts (``max_duration``), so it always holds one ban lifetime
  and never grows past it; an entry trimmed away was a ban that has ended.
- ``PREFIX active``: a sorted set, one member per target, rule and origin, scored by
  its end in the server's milliseconds; written with the stream entry (ZADD GT keeps
  the longest), trimmed of ended bans with each batch.  A host whose position is lost
  (new, or Redis lost its data) reads it instead of the stream.

The commands are XADD, ZADD, ZREMRANGEBYSCORE, XREAD, XRANGE, XREVRANGE, ZRANGEBYSCORE,
TIME, PING and CLIENT SETNAME: what an ACL user restricted to the prefix needs
(docs/fleet.md).  Every call may raise redis.RedisError; the link
(rblguard.fleet.link) owns the retrying.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from rblguard.fleet.entries import snapshot_member, stream_fields
from rblguard.fleet.settings import FleetSettings

SNAPSHOT_CHUNK = 20_000  # members per ZRANGEBYSCORE while resynchronising


def connect(settings: FleetSettings, read_timeout: float) -> Any:
    """A redis-py client for the hub, its timeouts and retries pinned: redis-py's
    defaults changed between versions (4.3 retries nothing, 6.0 retries three times),
    and the link does its own jittered retrying, so the client never retries alone."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    opts: dict[str, Any] = {
        "username": settings.username, "password": settings.password(),
        "socket_timeout": read_timeout, "retry_on_timeout": False,
        "retry": Retry(NoBackoff(), 0), "health_check_interval": 0,
        "client_name": f"rblguard-{settings.name}",
    }
    url = settings.redis or ""
    if not url.startswith("unix://"):  # redis-py 4.3's unix connection has no such option
        opts["socket_connect_timeout"] = settings.timeout
    if settings.tls is not None:
        opts.update(ssl_ca_certs=settings.tls.ca, ssl_certfile=settings.tls.cert,
                    ssl_keyfile=settings.tls.key,
                    ssl_check_hostname=settings.tls.check_hostname)
    if settings.sentinels:
        from redis.sentinel import Sentinel

        sentinel_opts = {"socket_timeout": settings.timeout,
                         "socket_connect_timeout": settings.timeout,
                         "username": settings.username, "password": opts["password"]}
        if settings.tls is not None:
            opts["ssl"] = True
        sentinels = Sentinel(list(settings.sentinels), sentinel_kwargs=sentinel_opts)
        return sentinels.master_for(settings.service, **opts)
    return redis.Redis.from_url(url, **opts)


class Hub:
    """The fleet's keys on one client; each method is one round trip."""

    def __init__(self, client: Any, settings: FleetSettings) -> None:
        self.client = client
        self.stream = f"{settings.prefix}bans"
        self.snapshot = f"{settings.prefix}active"
        self.keep_ms = int(settings.max_duration * 1000)
        self.origin = settings.name
        self.offset_ms = 0  # clock_offset() when connected

    def clock_offset(self) -> int:
        """Server time minus this host's, in ms (half the round trip taken off): what
        turns the server's stream times into this host's clock, whatever its error."""
        before = time.time()
        sec, usec = self.client.time()
        after = time.time()
        return int(sec * 1000 + usec // 1000 - (before + after) * 500)

    def publish(self, bans: list[tuple[str, int, str]], offset_ms: int) -> None:
        """(target, remaining seconds, rule) of this host's bans, in one pipeline."""
        now_ms = int(time.time() * 1000) + offset_ms
        floor = now_ms - self.keep_ms
        pipe = self.client.pipeline(transaction=False)
        ends: dict[str, float] = {}
        for target, seconds, rule in bans:
            pipe.xadd(self.stream, stream_fields(target, seconds, rule, self.origin),
                      minid=floor, approximate=True)
            ends[snapshot_member(target, rule, self.origin)] = now_ms + seconds * 1000
        pipe.zadd(self.snapshot, ends, gt=True)
        pipe.zremrangebyscore(self.snapshot, "-inf", now_ms)
        pipe.execute()

    def last_id(self) -> str | None:
        """The id of the stream's newest entry, None if it has none (or no stream)."""
        newest = self.client.xrevrange(self.stream, count=1)
        return newest[0][0].decode() if newest else None

    def holds(self, entry_id: str) -> bool:
        """Whether the stream still has the entry ``entry_id``: after a disconnect, a
        missing one means the hub lost its data (or it ended long ago)."""
        return bool(self.client.xrange(self.stream, entry_id, entry_id, count=1))

    def read(self, cursor: str, block_ms: int, count: int) -> list[tuple[bytes, dict]]:
        """Up to ``count`` entries after ``cursor``, waiting up to ``block_ms``."""
        got = self.client.xread({self.stream: cursor}, count=count, block=block_ms)
        return got[0][1] if got else []

    def active(self, now_ms: int) -> Iterator[list[tuple[bytes, float]]]:
        """The snapshot's members still active at ``now_ms``, a chunk at a time."""
        start = 0
        while True:
            chunk = self.client.zrangebyscore(self.snapshot, f"({now_ms}", "+inf",
                                              start=start, num=SNAPSHOT_CHUNK,
                                              withscores=True)
            if chunk:
                yield chunk
            if len(chunk) < SNAPSHOT_CHUNK:
                return
            start += len(chunk)
