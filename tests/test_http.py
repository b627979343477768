"""Shards from a real HTTP server: a thread of this process on 127.0.0.1 serving a shard folder, well
or badly (a dropped connection, 404, 500, a server that stalls). Every failure costs a warning and a
count, the epoch keeps its length, and nothing hangs: each load runs under a deadline."""

from __future__ import annotations

import collections
import gc
import os
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import pack_photos
from restorer.config import DataConfig
from restorer.data import pipeline
from restorer.data.pipeline import train_loader, val_loader

PATTERN = "train-{000000..000002}.tar"
STEPS = 4  # batches of 4 per epoch: 16 patches, 8 images at 2 each, from 3 shards of 4 images
DEADLINE_S = 40  # a load that takes longer has hung (each finishes in a few seconds)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """14 photos: 12 for training in 3 shards of 4 (train-000000..000002.tar), 2 for validation."""
    return pack_photos(tmp_path_factory.mktemp("http"), 14, maxcount=4, size=(200, 160))


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """A stalled transfer is abandoned after 2 s (60 by default) and a retry waits 0.05 s (1 s)."""
    monkeypatch.setenv("RESTORER_HTTP_STALL_S", "2")
    monkeypatch.delenv("RESTORER_HTTP_RETRIES", raising=False)
    monkeypatch.setattr(pipeline, "HTTP_RETRY_DELAY_S", 0.05)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client gone mid-answer is what some tests do
        pass


class ShardServer:
    """Serves `folder` on 127.0.0.1 (a free port) from a thread. `faults` maps a file name to how
    its answer goes wrong: ("status", code), ("status_first", code, n): that code for the first n
    requests, then the file; ("drop", nbytes): headers for the whole file, nbytes of it, then the
    socket is shut; ("stall", nbytes): headers and nbytes, then nothing (nbytes None: not even a
    status line). `hits` counts the requests per file."""

    def __init__(self, folder: Path, faults: dict | None = None):
        self.folder, self.faults, self.hits = folder, faults or {}, collections.Counter()
        self.release = threading.Event()  # ends the stalled answers when the test is done
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.hits[name] += 1
                path = outer.folder / name
                fault = outer.faults.get(name, ("none",))
                if fault[0] == "status_first" and outer.hits[name] <= fault[2]:
                    fault = ("status", fault[1])
                if fault[0] == "status" or not path.is_file():
                    self.send_error(fault[1] if fault[0] == "status" else 404)
                    return
                if fault[0] == "stall" and fault[1] is None:
                    outer.release.wait(DEADLINE_S)  # the request was read: no answer comes
                    self.close_connection = True
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault[0] == "drop":
                    self.wfile.write(data[: fault[1]])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif fault[0] == "stall":
                    self.wfile.write(data[: fault[1]])
                    self.wfile.flush()
                    outer.release.wait(DEADLINE_S)
                    self.close_connection = True
                else:
                    self.wfile.write(data)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _cfg(url: str, **kw) -> DataConfig:
    cfg = DataConfig(**{"train_urls": url, "epoch_samples": 4 * STEPS, "workers": 0, "shuffle_buffer": 4,
                        "patches_per_image": 2, **kw})
    cfg.validate()
    return cfg


def _deadline(fn, what: str):
    """fn() in a thread, which must end within DEADLINE_S; its result and its time."""
    out: list = []

    def run():
        try:
            out.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(("error", e))

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), f"{what} hung: not done after {DEADLINE_S} s"
    kind, value = out[0]
    if kind == "error":
        raise value
    return value, time.monotonic() - start


def _epochs(cfg: DataConfig, epochs: int = 1) -> tuple[list[list], float]:
    """`epochs` epochs of the training loader (the same streams go on from one to the next), and
    the seconds they took."""
    def run():
        loader = train_loader(cfg, batch_size=4, seed=0, steps=STEPS)
        return [list(loader) for _ in range(epochs)]
    return _deadline(run, "training batches from the server")


def _curls() -> list[int]:
    """curl processes that are children of this process (zombies included)."""
    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if name == "curl" and int(rest[1]) == os.getpid():
            mine.append(int(pid))
    return mine


def _skips(err: str, url: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"restorer: warning: skipped shard {url}:")]


# ----------------------------------------------------------------------------- a server that answers


@pytest.mark.parametrize("workers", [0, 2])
def test_training_and_validation_batches_come_from_the_server(folder, capfd, workers):
    with ShardServer(folder) as server:
        cfg = _cfg(server.url(PATTERN), workers=workers, val_urls=server.url("val-000000.tar"))
        epochs, _ = _epochs(cfg, epochs=2)
        assert [len(e) for e in epochs] == [STEPS, STEPS]
        for inputs, targets, qualities in epochs[0] + epochs[1]:
            assert inputs.shape == targets.shape == (4, 3, 128, 128) and qualities.shape == (4,)
        if workers == 0:  # (with workers, each reads only its own shards: the 2 workers read 2 of the 3)
            assert set(server.hits) == {f"train-{i:06d}.tar" for i in range(3)}
        val, _ = _deadline(lambda: list(val_loader(cfg)), "validation from the server")
        assert sorted({key for *_, key in val}) == sorted(_val_keys(folder))
        assert len(val) == 2 * len(cfg.val_qualities)
    assert "warning" not in capfd.readouterr().err
    gc.collect()
    assert _curls() == []  # every curl was ended and reaped with its loader


def _val_keys(folder: Path) -> list[str]:
    with tarfile.open(folder / "val-000000.tar") as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


def test_a_shard_that_fails_before_its_first_byte_is_asked_again(folder, capfd):
    """503 twice, then the file: the default 2 new tries get it, nothing is skipped."""
    bad = "train-000001.tar"
    with ShardServer(folder, {bad: ("status_first", 503, 2)}) as server:
        epochs, _ = _epochs(_cfg(server.url(PATTERN)))
        assert [len(e) for e in epochs] == [STEPS]
        assert server.hits[bad] >= 3
    assert "warning" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- a server that fails


def _member_cuts(path: Path) -> dict[str, int]:
    """Where to cut a shard: between its first and second sample (a tar boundary: the tar reader
    alone takes the shard for a shorter, valid one), and inside the second sample's image."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    second = [m for m in members if m.name.split(".")[0] == keys[1]]
    image = next(m for m in second if not m.name.endswith(".json"))
    return {"boundary": second[0].offset, "mid-member": image.offset_data + image.size // 2}


@pytest.mark.parametrize("where", ["boundary", "mid-member"])
def test_a_connection_dropped_mid_shard_costs_a_warning_and_a_count(folder, capfd, where):
    bad = "train-000001.tar"
    cut = _member_cuts(folder / bad)[where]
    with ShardServer(folder, {bad: ("drop", cut)}) as server:
        epochs, _ = _epochs(_cfg(server.url(PATTERN)), epochs=2)
        url, hits = server.url(bad), server.hits[bad]
    assert [len(e) for e in epochs] == [STEPS, STEPS]
    lines = _skips(capfd.readouterr().err, url)
    assert lines, "the dropped connection went unnoticed"
    assert all("HttpShardError: curl: (18) transfer closed with" in line for line in lines)
    # one count per read of the shard (the first 3 are printed), not a second one for the tar cut short
    assert [line.split("(")[-1] for line in lines] == [f"{n} skipped so far by rank 0 worker 0)"
                                                       for n in range(1, min(hits, 3) + 1)]


@pytest.mark.parametrize("code, message", [(404, "The requested URL returned error: 404"),
                                           (500, "The requested URL returned error: 500 (after 3 tries)")])
def test_a_shard_answering_an_http_error_costs_a_warning_and_a_count(folder, capfd, code, message):
    """A 404 is not asked again; a 500 is, twice (RESTORER_HTTP_RETRIES), then skipped: seconds, not
    webdataset's 30 tries 2 s apart."""
    bad = "train-000002.tar"
    with ShardServer(folder, {bad: ("status", code)}) as server:
        epochs, _ = _epochs(_cfg(server.url(PATTERN)), epochs=2)
        url, hits = server.url(bad), server.hits[bad]
    assert [len(e) for e in epochs] == [STEPS, STEPS]
    lines = _skips(capfd.readouterr().err, url)
    assert lines and f"HttpShardError: curl: (22) {message} (1 skipped so far by rank 0 worker 0)" in lines[0]
    tries = 1 if code == 404 else 3
    assert hits % tries == 0  # each read of the shard: `tries` requests, one count (the first 3 counts are printed)
    assert [line.split("(")[-1] for line in lines] == [f"{n} skipped so far by rank 0 worker 0)"
                                                       for n in range(1, min(hits // tries, 3) + 1)]


@pytest.mark.slow
@pytest.mark.parametrize("sent", [None, 0, 3000])
def test_a_stalled_server_is_abandoned_after_the_stall_limit(folder, capfd, sent):
    """None: the request is read and never answered; 0: headers only; 3000: headers and 3000 bytes
    of the shard, then nothing. With RESTORER_HTTP_STALL_S=2 each read of that shard gives up
    after 2 s (60 by default), and is not asked again (a 5xx would be)."""
    bad = "train-000000.tar"
    with ShardServer(folder, {bad: ("stall", sent)}) as server:
        epochs, seconds = _epochs(_cfg(server.url(PATTERN)))
        url, hits = server.url(bad), server.hits[bad]
    assert [len(e) for e in epochs] == [STEPS]
    lines = _skips(capfd.readouterr().err, url)
    assert lines and "HttpShardError: curl: (28) Operation too slow" in lines[0]
    assert "RESTORER_HTTP_STALL_S=2" in lines[0] and lines[0].endswith("(1 skipped so far by rank 0 worker 0)")
    assert 1 <= hits <= 3 and len(lines) == hits  # one request, one count per read of it
    # each read of it gave up after about 2 s; curl judges speed over its last few seconds, so a stall
    # after a burst of bytes is noticed up to ~5 s later
    assert seconds < 8 * hits + 10, seconds


def test_http_settings_are_checked(monkeypatch):
    assert pipeline.http_settings() == (2, pipeline.HTTP_RETRIES)
    monkeypatch.delenv("RESTORER_HTTP_STALL_S")
    assert pipeline.http_settings() == (pipeline.HTTP_STALL_S, pipeline.HTTP_RETRIES) == (60, 2)
    monkeypatch.setenv("RESTORER_HTTP_RETRIES", "-1")
    with pytest.raises(ValueError, match="RESTORER_HTTP_RETRIES: must be a whole number of tries >= 0, got '-1'"):
        pipeline.http_settings()
    monkeypatch.setenv("RESTORER_HTTP_STALL_S", "soon")
    with pytest.raises(ValueError, match="RESTORER_HTTP_STALL_S: must be a whole number of seconds >= 1, got 'soon'"):
        pipeline.http_settings()
