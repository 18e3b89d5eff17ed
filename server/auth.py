"""The API key: one rule for every route. HTTP clients send `Authorization: Bearer KEY`; only `/stream` also takes
`?api_key=KEY`, because browsers cannot set headers on a WebSocket. The key is compared as sent (no trimming) in
constant time, and never written to a log (`RedactKeys`)."""

from __future__ import annotations

import hmac
import logging
import re

from starlette.datastructures import Headers, QueryParams

QUERY_KEY_ROUTES = ("/stream", "/gateway")
OPEN_ROUTES = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")  # probes carry no secrets
# The monitor page and its static files hold no data: the page asks for the key and sends it with its API calls.
OPEN_PAGES = ("/",)
OPEN_PREFIXES = ("/static/",)


def is_open(path: str) -> bool:
    return path in OPEN_ROUTES or path in OPEN_PAGES or path.startswith(OPEN_PREFIXES)


def offered_key(headers: Headers, query: QueryParams, path: str) -> str | None:
    header = headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        return value if scheme.lower() == "bearer" else None
    if path in QUERY_KEY_ROUTES:
        return query.get("api_key")
    return None


def key_matches(offered: str | None, key: str) -> bool:
    return offered is not None and hmac.compare_digest(offered.encode(), key.encode())


def missing_key_detail(path: str) -> str:
    where = "Authorization: Bearer KEY" + (" or ?api_key=KEY" if path in QUERY_KEY_ROUTES else "")
    return f"missing or wrong API key ({where})"


class RedactKeys(logging.Filter):
    """Replaces the value of `api_key=` in log records (uvicorn's access log writes the whole request line)."""

    PATTERN = re.compile(r"(api_key=)[^&\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.PATTERN.sub(r"\1REDACTED", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str) and "api_key=" in record.msg:
            record.msg = self.PATTERN.sub(r"\1REDACTED", record.msg)
        return True


def redact_keys_in_logs() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())
