"""`prepare --download`: fetch an archive that a public URL still serves.

Streamed to `<file>.part`; a rerun after an interruption asks for the rest with an HTTP
Range request (a server that ignores it sends everything again, and the .part restarts);
the finished file is hashed against the table before it is renamed into place.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from vpt_dml.data.archives import ArchiveError, check_listed, file_hashes
from vpt_dml.data.checksums import Listed
from vpt_dml.errors import DownloadError

BLOCK = 1 << 20


def download(entry: Listed, dest: Path, progress: bool = True, timeout: float = 60) -> Path:
    """dest = the archive's final path; resumes from dest.part; raises on a wrong hash."""
    if not entry.url:
        raise DownloadError(f"{entry.name}: no public URL is known; put the file in {dest.parent}")
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(entry.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if have and response.status != 206:
                have = 0  # the server sends the whole file: start the .part again
            length = response.headers.get("Content-Length")
            total = have + int(length) if length else entry.size
            with part.open("ab" if have else "wb") as out, tqdm(
                total=total, initial=have, unit="B", unit_scale=True,
                desc=f"download {entry.name}", disable=not progress,
            ) as bar:  # fmt: skip
                while block := response.read(BLOCK):
                    out.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is complete
            pass
        else:
            raise DownloadError(
                f'{entry.url}: HTTP {e.code} {e.reason}; the copy may be gone (README, "Getting the datasets")'
            ) from None
    except (urllib.error.URLError, HTTPException, OSError) as e:
        got = part.stat().st_size if part.exists() else 0
        raise DownloadError(
            f"{entry.url}: interrupted after {got:,} bytes ({e}); run the same command again "
            f"to resume from {part}"
        ) from None
    if entry.size is not None and part.stat().st_size < entry.size:
        raise DownloadError(
            f"{entry.url}: the server closed after {part.stat().st_size:,} of {entry.size:,} "
            f"bytes; run the same command again to resume from {part}"
        )
    try:
        check_listed(part, entry, file_hashes(part, progress), accept_unlisted=False)
    except ArchiveError:
        part.unlink()  # resuming a wrong file cannot make it right
        raise
    os.replace(part, dest)
    return dest
