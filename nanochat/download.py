"""A robust single-file HTTP downloader: stream, verify, retry, replace atomically.

Used for the pretraining shards, the CORE eval bundle and Hugging Face parquet files. The file
appears at `dest` only once it is complete (Content-Length matched) and `validate` accepted it;
a failed or interrupted download leaves nothing at `dest` and no temp file behind.

    download_file(url, dest, validate=check_parquet, retries=5, backoff=1.0)

Retried (with exponential backoff `backoff * 2**attempt`): connection errors and timeouts,
HTTP 5xx / 408 / 429 (honouring a numeric Retry-After up to 60 s), a body shorter than its
Content-Length, and a file that `validate` rejects. Any other HTTP error (404, 403, ...) fails
at once. Plain urllib: honours http(s)_proxy / no_proxy from the environment.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

CHUNK_BYTES = 1 << 20
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0
USER_AGENT = "nanochat-downloader/1.0"


class DownloadError(Exception):
    """A download that failed for good; `reason` says why (last error after the last retry)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"download of {url} failed: {reason}")
        self.url = url
        self.reason = reason


class _Retryable(Exception):
    """A failed attempt worth retrying; `wait_s` is a server-requested minimum delay."""

    def __init__(self, reason: str, wait_s: float = 0.0) -> None:
        super().__init__(reason)
        self.wait_s = wait_s


def temp_path(dest: Path) -> Path:
    """Where `dest` is written before it is complete: unique per process and thread."""
    return dest.with_name(f"{dest.name}.{os.getpid()}-{threading.get_ident()}.part")


def _retry_after_s(err: urllib.error.HTTPError) -> float:
    value = err.headers.get("Retry-After", "") if err.headers else ""
    try:
        return min(float(value), MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0  # absent, or an HTTP date: fall back to our own backoff


def _fetch_once(url: str, tmp: Path, timeout: float, progress: bool) -> None:
    """One attempt: stream `url` into `tmp`; raise _Retryable or DownloadError."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    received, expected = 0, None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.isdigit() else None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=expected, unit="B", unit_scale=True, desc=Path(url).name, leave=False)
            try:
                with open(tmp, "wb") as f:
                    while chunk := response.read(CHUNK_BYTES):
                        f.write(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except urllib.error.HTTPError as e:
        if e.code in RETRY_STATUS:
            raise _Retryable(f"HTTP {e.code} {e.reason}", _retry_after_s(e)) from None
        raise DownloadError(url, f"HTTP {e.code} {e.reason}") from None
    except http.client.IncompleteRead:
        raise _Retryable(f"truncated: connection closed after {received} of {expected} bytes") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, timeout
        raise _Retryable(f"{type(e).__name__}: {e} (after {received} bytes)") from None
    if expected is not None and received != expected:
        raise _Retryable(f"truncated: received {received} of {expected} bytes (Content-Length)")


def download_file(
    url: str,
    dest: Path,
    validate: Callable[[Path], None] | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60,
    progress: bool = False,
) -> Path:
    """Download `url` to `dest` (skipped if `dest` exists) and return `dest`.

    `validate(tmp)` raises on a bad file (checked before `dest` appears). Up to `retries` retries
    after the first attempt, waiting `backoff * 2**attempt` seconds between them. Raises
    DownloadError naming the url and the last reason.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    if retries < 0 or backoff < 0:
        raise ValueError(f"retries and backoff must be >= 0, got {retries} and {backoff}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    attempt = 0
    try:
        while True:
            try:
                _fetch_once(url, tmp, timeout, progress)
                if validate is not None:
                    try:
                        validate(tmp)
                    except Exception as e:  # any rejection by the caller's check is a bad file
                        raise _Retryable(f"validation failed: {type(e).__name__}: {e}") from None
                os.replace(tmp, dest)
                return dest
            except _Retryable as e:
                if attempt == retries:
                    raise DownloadError(url, f"{e} (gave up after {retries + 1} attempts)") from None
                time.sleep(max(backoff * 2**attempt, e.wait_s))
                attempt += 1
    finally:
        tmp.unlink(missing_ok=True)
