"""kombu's Redis transport, with one change: a queue entry that is not a kombu JSON envelope is moved to the
`arbor:dead-letter` list with an error in the log, instead of raising out of the worker's event loop. The list keeps
the newest `dead_letter_max` entries (a broker transport option, ARBOR_DEAD_LETTER_MAX): a flood of garbage
cannot fill Redis, whose `noeviction` would then refuse every new job.

Measured on kombu 5.7.0: `LPUSH search "{garbage"` makes every consuming worker exit with
"Unrecoverable error: JSONDecodeError" (the envelope is parsed in `Channel._brpop_read`, outside Celery's
message error handling). Bodies that parse as an envelope but carry a refused content type or a bad body are
already handled by Celery ("Can't decode message body", acked, the worker goes on).
"""

from __future__ import annotations

import logging

from kombu.exceptions import ContentDisallowed
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from queue import Empty

log = logging.getLogger("arbor.workers")

DEAD_LETTER = "arbor:dead-letter"


def _envelope(item) -> dict:
    payload = loads(bytes_to_str(item))
    if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict) or "body" not in payload:
        raise ContentDisallowed("not a kombu message envelope (needs 'body' and 'properties')")
    return payload


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options):
        # kombu 5.7.0's _brpop_read, with the envelope parse guarded
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next iteration reconnects
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                payload = _envelope(item)
            except Exception as exc:
                log.error("malformed message on queue %r moved to %s: %s: %r", dest, DEAD_LETTER, exc, bytes(item[:120]))
                cap = int(self.connection.client.transport_options.get("dead_letter_max", 10000))
                with self.conn_or_acquire() as client:
                    client.pipeline().lpush(DEAD_LETTER, item).ltrim(DEAD_LETTER, 0, cap - 1).execute()
                raise Empty() from None
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):
    Channel = Channel
