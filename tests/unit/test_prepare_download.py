"""`--download` against a server on 127.0.0.1 started here: a transfer cut off midway
resumes from the .part file with an HTTP Range request; a wrong byte is refused."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from tests.fake_layouts import fake_archives
from vpt_dml.data.archives import ArchiveError
from vpt_dml.data.checksums import ENV, Listed
from vpt_dml.data.download import DownloadError, download
from vpt_dml.data.prepare import main

PAYLOAD = bytes(range(256)) * 64  # 16 KiB


class Server:
    """Serves `body` with Range support; `cut_first` closes the first response halfway."""

    def __init__(self, body: bytes, cut_first: bool = False):
        self.body, self.cut, self.ranges = body, cut_first, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                start = 0
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(outer.body) - 1}/{len(outer.body)}"
                    )
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body) - start))
                self.end_headers()
                rest = outer.body[start:]
                if outer.cut:
                    outer.cut = False
                    self.wfile.write(rest[: len(rest) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(rest)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def entry(url: str, body: bytes) -> Listed:
    return Listed("file.tgz", len(body), hashlib.md5(body).hexdigest(),
                  hashlib.sha256(body).hexdigest(), url)  # fmt: skip


def test_a_cut_transfer_resumes_from_the_part_file_with_the_right_hash(tmp_path: Path):
    dest = tmp_path / "file.tgz"
    with Server(PAYLOAD, cut_first=True) as server:
        with pytest.raises(DownloadError, match="run the same command again to resume"):
            download(entry(server.url, PAYLOAD), dest, progress=False)
        part = dest.with_name("file.tgz.part")
        have = part.stat().st_size
        assert 0 < have < len(PAYLOAD) and not dest.exists()
        download(entry(server.url, PAYLOAD), dest, progress=False)
        assert server.ranges == [None, f"bytes={have}-"]  # only the rest was asked for
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_a_server_sending_a_wrong_byte_is_refused(tmp_path: Path):
    wrong = bytearray(PAYLOAD)
    wrong[1000] ^= 1
    dest = tmp_path / "file.tgz"
    with Server(bytes(wrong)) as server:
        with pytest.raises(ArchiveError, match=r"MD5 expected [0-9a-f]{32}, found [0-9a-f]{32}"):
            download(entry(server.url, PAYLOAD), dest, progress=False)
    assert not dest.exists() and not dest.with_name("file.tgz.part").exists()


def test_prepare_download_fetches_a_missing_archive_and_prepares_it(tmp_path, monkeypatch):
    import dataclasses

    from vpt_dml.data import registry

    (archive,) = fake_archives("cub", tmp_path / "built")
    body = archive.read_bytes()
    with Server(body) as server:
        table = tmp_path / "table.json"
        e = entry(server.url, body)
        table.write_text(json.dumps({"CUB_200_2011.tgz": {"size": e.size, "md5": e.md5,
                                                         "sha256": e.sha256, "url": e.url}}))  # fmt: skip
        monkeypatch.setenv(ENV, str(table))
        counts = {"train_images": 4, "train_classes": 2, "test_images": 4, "test_classes": 2}
        monkeypatch.setitem(registry.DATASETS, "cub",
                            dataclasses.replace(registry.DATASETS["cub"], official=counts))  # fmt: skip
        empty = tmp_path / "archives"
        empty.mkdir()
        args = ["cub", "--archives", str(empty), "--root", str(tmp_path / "data"), "--no-progress"]
        assert main(args) == 2  # without --download: names what is missing
        assert main([*args, "--download"]) == 0
    assert (empty / "CUB_200_2011.tgz").read_bytes() == body
    assert (tmp_path / "data" / "split.json").is_file()
