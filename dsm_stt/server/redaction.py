"""Keys never reach a log: the ``auth_id`` query parameter is masked in uvicorn's lines.

Owns ``RedactKeys``, a ``logging.Filter`` that rewrites any ``auth_id=<key>`` (the browsers'
way to pass the API key, moshi-server's) in a record to ``auth_id=***``, and ``install``, which
puts it on the loggers that print request lines: ``uvicorn.access`` (HTTP) and
``uvicorn.error`` (WebSocket accept / deny lines). Right and wrong keys alike: a wrong key is
often a right key with a typo.
"""

from __future__ import annotations

import logging
import re

_KEY = re.compile(r"(auth_id=)[^&\s\"']*", re.IGNORECASE)
LOGGERS = ("uvicorn.access", "uvicorn.error")


class RedactKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "auth_id=" in message.lower():
            record.msg, record.args = _KEY.sub(r"\1***", message), ()
        return True


def install() -> None:
    """Put one ``RedactKeys`` on each request-line logger (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())
