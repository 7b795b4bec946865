"""Verified, resumable downloads and safe zip extraction (stdlib only).

Torch-, numpy- and SimpleITK-free on purpose: the Slicer GUI process downloads and imports model packages too.
A download streams into ``<destination>.part``; an interrupted one is resumed with an HTTP Range request the next
time (or restarted when the server ignores Range), and the file only gets its final name after its size and sha256
matched. Zip archives are checked entry by entry before anything is written (zip-slip, links, zip bombs).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import stat
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Optional

from MIADeepLearningLib import paths
from MIADeepLearningLib.engine.errors import ModelError

ProgressCallback = Callable[[int, Optional[int]], None]

PART_SUFFIX = ".part"
USER_AGENT = "MIADeepLearning-model-download/1"
# Zip limits: far above any model package, far below what would fill a disk.
MAX_EXTRACTED_BYTES = 16 << 30
MAX_ZIP_ENTRIES = 20000
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _short_hash(value: str) -> str:
    return f"{value[:12]}…"


def _resolve_destination(destination: str | Path) -> Path:
    """Relative destinations land in the user's model cache ($MIADL_CACHE_DIR/models)."""
    destination = Path(destination).expanduser()
    return destination if destination.is_absolute() else paths.models_cache_dir() / destination


def _sha256_of(path: Path, chunk_size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open(url: str, offset: int, timeout_s: float):
    """Open the URL, asking for the bytes from ``offset`` on when resuming; HTTP errors become ModelError."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            return error  # the partial file does not fit the server's file; the caller restarts from zero
        if error.code == 404:
            raise ModelError(f"The file {url} was not found on the server (HTTP 404).") from error
        raise ModelError(f"The server refused to send {url} (HTTP {error.code} {error.reason}).") from error
    except urllib.error.URLError as error:
        if isinstance(error.reason, (socket.timeout, TimeoutError)):
            raise ModelError(f"The server of {url} did not answer within {timeout_s:g} seconds.") from error
        raise ModelError(f"Could not connect to download {url} ({error.reason}).") from error
    except (socket.timeout, TimeoutError) as error:
        raise ModelError(f"The server of {url} did not answer within {timeout_s:g} seconds.") from error
    except (http.client.HTTPException, ConnectionError) as error:
        raise ModelError(f"The connection to {url} failed before the download started ({error!r}).") from error


def _content_range_start(response) -> tuple[int | None, int | None]:
    """(first byte, total size) from a 206 answer's Content-Range header; (None, None) when it is unusable."""
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "") or "")
    if not match:
        return None, None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def download_file(
    url: str,
    destination: str | Path,
    sha256: str,
    size: int | None = None,
    progress: ProgressCallback | None = None,
    timeout_s: float = 60,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``destination`` and return it, only once its size and sha256 match.

    Bytes go to ``<destination>.part`` first; an interrupted download keeps that file so the next call resumes it
    (Range request; restarted from zero when the server ignores Range). A size or hash mismatch deletes the partial
    file and raises ModelError. ``progress(bytes_done, bytes_total_or_None)`` is called after every chunk.
    A relative ``destination`` is placed in the user model cache (paths.models_cache_dir()).
    """
    if not re.match(r"^https?://", url, re.IGNORECASE):
        raise ModelError(f"Only http and https downloads are supported, not {url}.")
    expected = sha256.lower()
    destination = _resolve_destination(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + PART_SUFFIX)

    if destination.is_file():
        if (size is None or destination.stat().st_size == size) and _sha256_of(destination, chunk_size) == expected:
            if progress:
                progress(destination.stat().st_size, destination.stat().st_size)
            return destination
        destination.unlink()

    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0

    response = None
    for _attempt in range(2):
        if size is not None and offset == size:
            break  # the partial file is already complete: verify it below
        response = _open(url, offset, timeout_s)
        status = getattr(response, "status", None) or response.getcode()
        if status == 416:  # our partial file is not a prefix of the server's file
            response.close()
            response, offset = None, 0
            part.unlink(missing_ok=True)
            continue
        if offset and status == 206:
            start, _total = _content_range_start(response)
            if start != offset:  # a range we did not ask for: start over
                response.close()
                response, offset = None, 0
                part.unlink(missing_ok=True)
                continue
        elif offset:
            offset = 0  # the server ignored Range and sends the whole file: restart cleanly
        break
    total = _expected_total(response, offset, size, url) if response is not None else size
    done = _stream_to_part(response, part, offset, total, url, progress, timeout_s, chunk_size)

    if size is not None and done != size:
        part.unlink(missing_ok=True)
        raise ModelError(
            f"The file downloaded from {url} has {done} bytes instead of its registered {size}; the download was "
            "discarded."
        )
    actual = _sha256_of(part, chunk_size)
    if actual != expected:
        part.unlink(missing_ok=True)
        raise ModelError(
            f"The file downloaded from {url} does not match its registered sha256 (expected {_short_hash(expected)}, "
            f"got {_short_hash(actual)}); the download was discarded."
        )
    os.replace(part, destination)
    return destination


def _expected_total(response, offset: int, size: int | None, url: str) -> int | None:
    """The full file size the server announces (Content-Length + offset, or Content-Range); refuse a wrong one."""
    announced = None
    status = getattr(response, "status", None) or response.getcode()
    if status == 206:
        _start, announced = _content_range_start(response)
    if announced is None:
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit():
            announced = int(length) + offset
    if size is not None and announced is not None and announced != size:
        response.close()
        raise ModelError(
            f"The server announces {announced} bytes for {url} but the registered size is {size}; nothing was "
            "downloaded."
        )
    return size if size is not None else announced


def _stream_to_part(
    response,
    part: Path,
    offset: int,
    total: int | None,
    url: str,
    progress: ProgressCallback | None,
    timeout_s: float,
    chunk_size: int,
) -> int:
    """Append the response body to the partial file; keep what arrived when the transfer breaks off."""
    if response is None:
        return offset
    done = offset
    try:
        with response, open(part, "ab" if offset else "wb") as stream:
            if offset:
                stream.truncate(offset)
            if progress:
                progress(done, total)
            # read1: whatever arrived (up to chunk_size), so a stall keeps the bytes received before it
            read = getattr(response, "read1", None) or response.read
            while True:
                try:
                    chunk = read(chunk_size)
                except (socket.timeout, TimeoutError) as error:
                    raise ModelError(
                        f"The download of {url} stalled for {timeout_s:g} seconds after {done} bytes; run it again "
                        "to resume it."
                    ) from error
                except (http.client.HTTPException, ConnectionError) as error:
                    raise ModelError(
                        f"The connection broke off after {done} bytes of {url}; run the download again to resume it."
                    ) from error
                if not chunk:
                    break
                if total is not None and done + len(chunk) > total:
                    stream.close()
                    part.unlink(missing_ok=True)
                    raise ModelError(
                        f"The server sent more than the {total} bytes expected for {url}; the download was discarded."
                    )
                stream.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except OSError as error:  # disk full, permissions: the network part is handled above
        raise ModelError(f"Could not write the download to {part} ({error.strerror or error}).") from error
    if total is not None and done < total:
        raise ModelError(
            f"The download of {url} stopped after {done} of {total} bytes (the connection closed early); run it again "
            "to resume it."
        )
    return done


# ------------------------------------------------------------------------------------------------------ zip files


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    """Why an archive entry must not be extracted (zip-slip, links, devices), or None."""
    name = info.filename.replace("\\", "/")
    if "\x00" in name:
        return "a NUL byte in its name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a '..' path component"
    kind = stat.S_IFMT(info.external_attr >> 16)
    if stat.S_ISLNK(kind):
        return "a symbolic link"
    if kind and not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
        return "a device or other special file"
    if info.flag_bits & 0x1:
        return "encryption"
    return None


def extract_zip_safely(
    archive: str | Path,
    destination: str | Path,
    max_bytes: int = MAX_EXTRACTED_BYTES,
    max_entries: int = MAX_ZIP_ENTRIES,
) -> Path:
    """Extract a zip into a new folder after checking every entry; on any problem nothing stays behind.

    Refused: absolute paths, '..' components, symbolic links and device entries, duplicate names, more than
    ``max_entries`` entries or ``max_bytes`` uncompressed bytes (declared or actually written).
    """
    archive, destination = Path(archive), Path(destination)
    if destination.exists():
        raise ModelError(f"Cannot extract {archive.name} into {destination}, which already exists.")
    try:
        with zipfile.ZipFile(archive) as zipped:
            entries = zipped.infolist()
            _check_entries(archive, entries, max_bytes, max_entries)
            destination.mkdir(parents=True)
            try:
                _extract_checked(zipped, entries, destination, archive, max_bytes)
            except BaseException:
                shutil.rmtree(destination, ignore_errors=True)
                raise
    except zipfile.BadZipFile as error:
        raise ModelError(f"{archive.name} is not a valid zip archive ({error}).") from error
    except OSError as error:
        raise ModelError(f"Could not extract {archive.name} ({error.strerror or error}).") from error
    return destination


def _check_entries(archive: Path, entries: list[zipfile.ZipInfo], max_bytes: int, max_entries: int) -> None:
    if len(entries) > max_entries:
        raise ModelError(
            f"{archive.name} has {len(entries)} entries (at most {max_entries} allowed); nothing was extracted."
        )
    declared, seen = 0, set()
    for info in entries:
        reason = _unsafe_reason(info)
        if reason:
            raise ModelError(
                f"{archive.name} contains an unsafe entry '{info.filename}' ({reason}); nothing was extracted."
            )
        key = info.filename.replace("\\", "/").rstrip("/")
        if key in seen:
            raise ModelError(f"{archive.name} contains '{info.filename}' twice; nothing was extracted.")
        seen.add(key)
        declared += info.file_size
    if declared > max_bytes:
        raise ModelError(
            f"{archive.name} would unpack to {declared} bytes, more than the {max_bytes} allowed; nothing was "
            "extracted."
        )


def _extract_checked(
    zipped: zipfile.ZipFile, entries: list[zipfile.ZipInfo], destination: Path, archive: Path, max_bytes: int
) -> None:
    root = os.path.realpath(destination)
    written = 0
    for info in entries:
        parts = [part for part in info.filename.replace("\\", "/").split("/") if part not in ("", ".")]
        if not parts:
            continue
        target = destination.joinpath(*parts)
        if os.path.commonpath([root, os.path.realpath(target)]) != root:  # defence in depth after _unsafe_reason
            raise ModelError(f"{archive.name} contains an entry '{info.filename}' outside the package; nothing kept.")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipped.open(info) as source, open(target, "xb") as stream:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                written += len(chunk)
                if written > max_bytes:
                    raise ModelError(
                        f"{archive.name} unpacks to more than the {max_bytes} bytes allowed; nothing was extracted."
                    )
                stream.write(chunk)
