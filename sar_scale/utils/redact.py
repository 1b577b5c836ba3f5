"""Keep secrets out of logs, MLflow params/tags, resolved-config files, error messages and job specs
(reliability promise 8) - the one home of what counts as a secret, used by training, export, storage
and the cluster profiles.

Three nets, because a secret can arrive three ways: under a secret-looking key (``password:``,
``aws_secret_access_key:``), inside a URL (``https://user:pw@host``, ``?token=...``), or as the
value of a secret environment variable that someone pasted into a config. Everything written by
the trainer goes through :func:`redact_obj` / :func:`redact_text`, and :class:`SecretFilter` scrubs
log records.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
# key names (last path component) that hold secrets; `tokens_per_batch` must NOT match
_SECRET_KEY = re.compile(
    r"(^|[_.-])(secret|secrets|password|passwd|pwd|token|api[_-]?key|access[_-]?key|private[_-]?key|"
    r"credential|credentials|auth|authorization|session[_-]?token|client[_-]?secret)([_.-]|$)", re.I)
# ...unless the name says it holds a setting about the secret, not the secret (RAY_AUTH_MODE=token)
_SETTING_SUFFIX = re.compile(r"[_.-](mode|type|method|scheme|kind|enabled|disabled|required|enable|disable)$", re.I)
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@")
_QUERY_SECRET = re.compile(
    r"([?&](?:[^=&\s]*(?:token|secret|password|passwd|key|signature|sig|credential)[^=&\s]*)=)[^&\s]+", re.I)
_MIN_SECRET_LEN = 4


def is_secret_key(name: str) -> bool:
    """A config key or environment variable name that holds a secret (``aws_secret_access_key``,
    ``MLFLOW_TRACKING_TOKEN``, ``api-key``); ``tokens_per_batch`` / ``TOKENIZERS_PARALLELISM`` do not."""
    return bool(_SECRET_KEY.search(str(name))) and not _SETTING_SUFFIX.search(str(name))


def secret_env_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look secret (AWS_SECRET_ACCESS_KEY, *_TOKEN, ...)."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if is_secret_key(k) and v and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)  # longest first so substrings do not half-mask


def redact_text(text: str, extra_secrets: list[str] | None = None) -> str:
    """Mask URL credentials, secret query parameters and known secret values in ``text``."""
    if not text:
        return text
    out = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    out = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}{MASK}", out)
    for s in [*secret_env_values(), *(extra_secrets or [])]:
        if s and s in out:
            out = out.replace(s, MASK)
    return out


def redact_obj(obj: Any, extra_secrets: list[str] | None = None) -> Any:
    """A copy of a nested dict/list with secret-keyed values masked and every string scrubbed."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(k) and v not in (None, "", {}, []) else redact_obj(v, extra_secrets))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v, extra_secrets) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, extra_secrets)
    return obj


def collect_secret_values(obj: Any) -> list[str]:
    """String values stored under secret-looking keys (to scrub them from free text as well)."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_secret_key(k) and isinstance(v, str) and len(v) >= _MIN_SECRET_LEN:
                found.append(v)
            else:
                found += collect_secret_values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found += collect_secret_values(v)
    return found


class SecretFilter(logging.Filter):
    """Scrub every log record (message and args) before any handler sees it."""

    def __init__(self, extra_secrets: list[str] | None = None):
        super().__init__()
        self.extra = list(extra_secrets or [])

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is not ours to fix here
            return True
        clean = redact_text(msg, self.extra)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def install_log_filter(extra_secrets: list[str] | None = None) -> SecretFilter:
    """Attach a :class:`SecretFilter` to the root logger's handlers (and the root logger itself)."""
    f = SecretFilter(extra_secrets)
    root = logging.getLogger()
    for target in [root, *root.handlers]:
        for old in [x for x in target.filters if isinstance(x, SecretFilter)]:
            target.removeFilter(old)
        target.addFilter(f)
    return f
