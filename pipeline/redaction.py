"""Credentials never shown: every URI restorl prints, logs or writes passes through here.

Tracking URIs may carry a password (`postgresql://user:pass@host/db`, `https://user:pass@host`),
and URLs may carry tokens in their query (`?token=…`, presigned `X-Amz-Signature=…`).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "***"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@")
_SECRET_QUERY = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd|token|secret|access_token|api_key|"
                           r"x-amz-signature|x-amz-credential|x-amz-security-token|sig|signature)=)[^&\s]*")


def redact(text: str) -> str:
    """`text` with the password of every URI in it and every secret-looking query value hidden."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{HIDDEN}@", str(text))
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{HIDDEN}", text)


def without_credentials(uri: str) -> tuple[str, tuple[str, str] | None]:
    """`uri` without its user:password part, and that pair (None when there is none): for
    requests that send the credentials as an Authorization header instead."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), (parts.username or "", parts.password or "")
