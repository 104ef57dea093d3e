"""Downloads that cannot silently go wrong, and the Hugging Face hub's conventions.

Used for the pretraining shards, the CORE eval bundle and the hub's parquet files. The file
appears at `dest` only once it is complete (Content-Length matched), its sha256 matched (when
one is expected) and `validate` accepted it:

    download_file(url, dest, validate=check_parquet, sha256=hexdigest, headers=hub_headers(url))

Retried (with exponential backoff `backoff * 2**attempt`): connection errors and timeouts,
HTTP 5xx / 408 / 429 (honouring a numeric Retry-After up to 60 s), a body shorter than its
Content-Length (the next attempt resumes with an HTTP Range request), a sha256 mismatch and a
file that `validate` rejects (both start again from byte 0). Any other HTTP error (404, 403, ...)
fails at once. One process at a time downloads a given `dest` (a file lock next to it): the others
wait and then find the file there. A download that fails for good leaves nothing behind; one
killed mid-way leaves `dest.part`, which the next run resumes. Plain urllib: honours
http(s)_proxy / no_proxy from the environment.

Hub conventions (as huggingface_hub reads them): HF_ENDPOINT (alias NANOCHAT_HF_URL) is the hub's
base URL, HF_HUB_OFFLINE=1 forbids every network call, HF_TOKEN (else the file $HF_HOME/token when
HF_HOME is set) is sent as a bearer token to the hub only (not along a redirect to another
host), and HF_HOME holds the hub cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from nanochat.config import UserError

CHUNK_BYTES = 1 << 20
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0
USER_AGENT = "nanochat-downloader/1.0"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


class DownloadError(UserError):
    """A download that failed for good; `reason` says why (last error after the last retry)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"download of {url} failed: {reason}")
        self.url = url
        self.reason = reason


class ChecksumError(ValueError):
    """A downloaded or stored file whose sha256 is not the expected one."""


class _Retryable(Exception):
    """A failed attempt worth retrying; `wait_s` is a server-requested minimum delay."""

    def __init__(self, reason: str, wait_s: float = 0.0) -> None:
        super().__init__(reason)
        self.wait_s = wait_s


def temp_path(dest: Path) -> Path:
    """Where an atomic write of `dest` goes first: unique per process and thread."""
    return dest.with_name(f"{dest.name}.{os.getpid()}-{threading.get_ident()}.part")


def partial_path(dest: Path) -> Path:
    """Where a download of `dest` grows: one name, so that a later attempt or run resumes it."""
    return dest.with_name(f"{dest.name}.part")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created, and removed on release) across processes and
    threads. A waiter that wakes on a lock file already removed takes the new one instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder before us removed it: lock the new file
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: nobody can hold the removed inode after us
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Hugging Face hub conventions

def hf_endpoint() -> str:
    """The hub's base URL: $HF_ENDPOINT, else $NANOCHAT_HF_URL (older name), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or os.environ.get("NANOCHAT_HF_URL") or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or true/yes/on): no network call at all, cached files only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_token() -> str | None:
    """$HF_TOKEN, else the token file $HF_HOME/token when HF_HOME is set."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    home = os.environ.get("HF_HOME")
    path = Path(home) / "token" if home else None
    if path is not None and path.is_file():
        return path.read_text().strip() or None
    return None


def hub_headers(url: str) -> dict[str, str]:
    """The Authorization header for a request to the hub; nothing for any other server."""
    token = hf_token()
    if token and url.startswith(hf_endpoint() + "/"):
        return {"Authorization": f"Bearer {token}"}
    return {}


def reachable(url: str, timeout: float = 5.0) -> bool:
    """True if `url`'s server answers a HEAD at all (any HTTP status counts); always False under
    HF_HUB_OFFLINE=1, without a request."""
    if hf_offline():
        return False
    try:
        with _open(url, {}, timeout, method="HEAD"):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


class _NoAuthAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib, but the token does not follow one to another host (the hub
    sends its files from a CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_NoAuthAcrossHosts)  # + urllib's defaults, proxies from the environment


def _open(url: str, headers: dict[str, str], timeout: float, method: str = "GET"):
    request = urllib.request.Request(url, method=method, headers={"User-Agent": USER_AGENT, **headers})
    return _OPENER.open(request, timeout=timeout)


def fetch_json(url: str, retries: int = 3, backoff: float = 1.0, timeout: float = 30) -> tuple[object, str | None]:
    """GET a JSON document (with the hub token where it applies): (value, next page URL from the
    Link header or None). Retried like download_file; DownloadError when it fails for good."""
    if hf_offline():
        raise DownloadError(url, "HF_HUB_OFFLINE=1 forbids network calls")
    attempt = 0
    while True:
        try:
            with _open(url, hub_headers(url), timeout) as response:
                body = response.read()
                link = response.headers.get("Link", "")
            match = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', link)
            return json.loads(body), (urllib.parse.urljoin(url, match.group(1)) if match else None)
        except urllib.error.HTTPError as e:
            if e.code not in RETRY_STATUS or attempt == retries:
                raise DownloadError(url, f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            if attempt == retries:
                raise DownloadError(url, f"{type(e).__name__}: {e}") from None
        time.sleep(backoff * 2**attempt)
        attempt += 1


def hub_tree(
    repo_id: str, revision: str = "main", path: str = "", repo_type: str = "datasets", endpoint: str | None = None,
    retries: int = 3, backoff: float = 1.0,
) -> dict[str, dict]:
    """The hub's listing of a repo folder (recursive), following its pages: {file path: {"size",
    "sha256"}}; sha256 is the LFS object id, None for a file not stored in LFS. 404 -> DownloadError.
    `endpoint`: default hf_endpoint()."""
    quoted_rev = urllib.parse.quote(revision, safe="")
    base = (endpoint or hf_endpoint()).rstrip("/")
    url = f"{base}/api/{repo_type}/{repo_id}/tree/{quoted_rev}/{urllib.parse.quote(path)}".rstrip("/") + "?recursive=true"
    files: dict[str, dict] = {}
    while url is not None:
        entries, url = fetch_json(url, retries, backoff)
        if not isinstance(entries, list):
            raise DownloadError(url or repo_id, f"hub listing is not a list: {str(entries)[:80]}")
        for entry in entries:
            if entry.get("type") == "file":
                lfs = entry.get("lfs") or {}
                files[entry["path"]] = {"size": entry.get("size"), "sha256": lfs.get("oid")}
    return files


# ---------------------------------------------------------------------------------------------
# download_file

def _retry_after_s(err: urllib.error.HTTPError) -> float:
    value = err.headers.get("Retry-After", "") if err.headers else ""
    try:
        return min(float(value), MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0  # absent, or an HTTP date: fall back to our own backoff


def _resume_start(response, offset: int) -> int:
    """Where the body of `response` starts in the file: `offset` for a 206 that continues it, 0 for
    a full body (200: the server ignored the Range)."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if match is None or int(match.group(1)) != offset:
        raise _Retryable(f"206 with Content-Range {response.headers.get('Content-Range')!r}, asked for bytes={offset}-")
    return offset


def _fetch_once(url: str, part: Path, timeout: float, progress: bool, headers: dict[str, str]) -> None:
    """One attempt: stream `url` into `part`, resuming after the bytes it holds already."""
    offset = part.stat().st_size if part.exists() else 0
    request_headers = {**headers, "Range": f"bytes={offset}-"} if offset else dict(headers)
    received, expected = 0, None
    try:
        with _open(url, request_headers, timeout) as response:
            start = _resume_start(response, offset)
            length = response.headers.get("Content-Length")
            expected = start + int(length) if length is not None and length.isdigit() else None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=expected, initial=start, unit="B", unit_scale=True, desc=Path(url).name, leave=False)
            try:
                with open(part, "ab" if start else "wb") as f:
                    received = start
                    while chunk := response.read(CHUNK_BYTES):
                        f.write(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the part is not a prefix the server can continue: start over
            part.unlink(missing_ok=True)
            raise _Retryable("HTTP 416 for a resumed range (starting again from byte 0)") from None
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
    sha256: str | None = None,
    headers: dict[str, str] | None = None,
    replace_mismatch: bool = False,
) -> Path:
    """Download `url` to `dest` (skipped if `dest` exists) and return `dest`.

    `sha256`: the expected hex digest (a mismatch is fetched again); with `replace_mismatch`, an
    existing `dest` that does not match it is replaced (checked under the lock, so concurrent
    callers replace it once). `validate(tmp)` raises on a bad file (checked before `dest`
    appears). Up to `retries` retries after the first attempt, waiting `backoff * 2**attempt`
    seconds between them. Raises DownloadError naming the url and the last reason; under
    HF_HUB_OFFLINE=1 it makes no request and raises at once.
    """
    dest = Path(dest)
    check_existing = replace_mismatch and sha256 is not None
    if dest.exists() and not check_existing:
        return dest
    if retries < 0 or backoff < 0:
        raise ValueError(f"retries and backoff must be >= 0, got {retries} and {backoff}")
    if hf_offline():
        raise DownloadError(url, f"HF_HUB_OFFLINE=1 forbids downloads and {dest} is not there")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)
    with file_lock(dest.with_name(f"{dest.name}.lock")):
        if dest.exists() and check_existing and sha256_file(dest) != sha256.lower():
            dest.unlink()
        if dest.exists():  # another process downloaded (or replaced) it while we waited
            return dest
        attempt = 0
        try:
            while True:
                try:
                    _fetch_once(url, part, timeout, progress, headers or {})
                    try:
                        if sha256 is not None and (digest := sha256_file(part)) != sha256.lower():
                            raise ChecksumError(f"sha256 {digest} != expected {sha256}")
                        if validate is not None:
                            validate(part)
                    except Exception as e:  # a bad file: start again from byte 0
                        part.unlink(missing_ok=True)
                        kind = "checksum mismatch" if isinstance(e, ChecksumError) else "validation failed"
                        raise _Retryable(f"{kind}: {type(e).__name__}: {e}") from None
                    os.replace(part, dest)
                    return dest
                except _Retryable as e:
                    if attempt == retries:
                        raise DownloadError(url, f"{e} (gave up after {retries + 1} attempts)") from None
                    time.sleep(max(backoff * 2**attempt, e.wait_s))
                    attempt += 1
        except DownloadError:
            part.unlink(missing_ok=True)  # failed for good: leave nothing behind
            raise
