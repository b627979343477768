"""Shards from a real HTTP server: a thread of this process on 127.0.0.1 serving a shard folder, well
or badly (a dropped connection, 404, 500, a server that stalls or trickles, https with a certificate
nobody trusts, Basic auth). Every failure costs a warning and a count, the epoch keeps its length,
nothing hangs (each load runs under a deadline) and no password is shown."""

from __future__ import annotations

import base64
import collections
import contextlib
import gc
import os
import re
import select
import signal
import socket
import struct
import ssl
import subprocess
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import assert_ok, pack_photos, train_cmd, train_env, train_here
from restorer.formats.config import DataConfig
from restorer.train import loader
from restorer.train.loader import SkipLog, read_images, train_loader, val_loader

PATTERN = "train-{000000..000002}.tar"
STEPS = 4  # batches of 4 per epoch: 16 patches, 8 images at 2 each, from 3 shards of 4 images
DEADLINE_S = 40  # a load that takes longer has hung (each finishes in a few seconds)
TRICKLE_TICK_S = 0.3  # a trickling server sends one byte this often: about 3 bytes/s


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """14 photos: 12 for training in 3 shards of 4 (train-000000..000002.tar), 2 for validation."""
    return pack_photos(tmp_path_factory.mktemp("http"), 14, maxcount=4, size=(200, 160))


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """A transfer is judged over 2 s of waiting (60 by default) and a retry waits 0.05 s (1 s)."""
    monkeypatch.setenv("RESTORER_HTTP_STALL_S", "2")
    monkeypatch.delenv("RESTORER_HTTP_RETRIES", raising=False)
    monkeypatch.delenv("RESTORER_HTTP_MIN_RATE", raising=False)
    monkeypatch.setattr(loader, "HTTP_RETRY_DELAY_S", 0.05)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client gone mid-answer is what some tests do
        pass


class ShardServer:
    """Serves `folder` on 127.0.0.1 (a free port) from a thread. `faults` maps a file name to how
    its answer goes wrong: ("status", code), ("status_first", code, n): that code for the first n
    requests, then the file; ("drop", nbytes): headers for the whole file, nbytes of it, then the
    socket is shut (("reset", nbytes): reset, an RST); ("stall", nbytes): headers and nbytes, then nothing (nbytes None: not even a
    status line); ("trickle",): headers, then one byte every TRICKLE_TICK_S; ("hold",): the
    request is announced (`held` is set) and answered once `go_on` is set. `auth`: the (user,
    password) of HTTP Basic auth every request must carry (401 otherwise); `tls`: (certificate
    file, key file) to serve https. `hits` counts the requests per file; `gone`, per file, the
    seconds from each stalled or trickled request to its client hanging up."""

    def __init__(self, folder: Path, faults: dict | None = None, auth: tuple[str, str] | None = None,
                 tls: tuple[Path, Path] | None = None):
        self.folder, self.faults, self.hits = folder, faults or {}, collections.Counter()
        self.gone: dict[str, list[float]] = collections.defaultdict(list)
        self.release = threading.Event()  # ends the stalled and trickled answers when the test is done
        self.asked = threading.Event()  # set at the first request
        self.held, self.go_on = threading.Event(), threading.Event()
        self.unauthorized = 0
        expected = "Basic " + base64.b64encode(":".join(auth).encode()).decode() if auth else None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def until_client_gone(self, name: str, start: float, trickle: bytes = b"") -> None:
                """Wait (sending `trickle` a byte a tick) until the client hangs up, or the test ends."""
                deadline = start + DEADLINE_S
                while not outer.release.is_set() and time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], TRICKLE_TICK_S)
                    try:
                        if readable and not self.connection.recv(1):
                            break
                        if trickle:
                            self.wfile.write(trickle[:1])
                            self.wfile.flush()
                            trickle = trickle[1:]
                    except OSError:
                        break
                else:
                    return
                outer.gone[name].append(time.monotonic() - start)

            def do_GET(self):
                start = time.monotonic()
                outer.asked.set()
                name = self.path.lstrip("/")
                if expected and self.headers.get("Authorization") != expected:
                    outer.unauthorized += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="shards"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                outer.hits[name] += 1
                path = outer.folder / name
                fault = outer.faults.get(name, ("none",))
                if fault[0] == "status_first" and outer.hits[name] <= fault[2]:
                    fault = ("status", fault[1])
                if fault[0] == "status" or not path.is_file():
                    self.send_error(fault[1] if fault[0] == "status" else 404)
                    return
                if fault[0] == "hold":
                    outer.held.set()
                    outer.go_on.wait(DEADLINE_S)
                if fault[0] == "stall" and fault[1] is None:
                    self.until_client_gone(name, start)  # the request was read: no answer comes
                    self.close_connection = True
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault[0] in ("drop", "reset"):
                    self.wfile.write(data[: fault[1]])
                    self.wfile.flush()
                    if fault[0] == "reset":  # an RST, not a FIN: curl's "Recv failure" (56), a transient error
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        for f in (self.wfile, self.rfile, self.connection):  # the last reference closes it
                            f.close()
                    else:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif fault[0] in ("stall", "trickle"):
                    sent = fault[1] if fault[0] == "stall" else 0
                    self.wfile.write(data[:sent])
                    self.wfile.flush()
                    self.until_client_gone(name, start, data[sent:] if fault[0] == "trickle" else b"")
                    self.close_connection = True
                else:
                    self.wfile.write(data)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.userinfo = f"{auth[0]}:{auth[1]}@" if auth else ""
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"{self.scheme}://{self.userinfo}127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.go_on.set()
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


def test_a_shard_reset_after_its_first_byte_is_never_asked_again(folder, capfd):
    """A reset connection is a transient error, which is tried again before the first byte; after it,
    the bytes already given to the tar reader cannot be taken back: one request a read, one warning."""
    bad = "train-000001.tar"
    cut = _member_cuts(folder / bad)["mid-member"]
    with ShardServer(folder, {bad: ("reset", cut)}) as server:
        epochs, _ = _epochs(_cfg(server.url(PATTERN)), epochs=2)
        url, hits = server.url(bad), server.hits[bad]
    assert [len(e) for e in epochs] == [STEPS, STEPS]
    lines = _skips(capfd.readouterr().err, url)
    assert lines and all("curl: (56)" in line for line in lines), lines
    assert hits == len(lines)  # each read of the shard asked for it once


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
    # the 2 epochs read the shard 2 or 3 times (each pass over the good shards gives about one
    # epoch), each read one count, all printed (the first 3 are): `tries` requests per count
    assert [line.split("(")[-1] for line in lines] == [f"{n} skipped so far by rank 0 worker 0)"
                                                       for n in range(1, len(lines) + 1)]
    assert 2 <= len(lines) <= 3 and hits == (1 if code == 404 else 3) * len(lines)


def _gone_after_the_stall_limit(seconds: list[float], reads: int) -> None:
    """Each read of a shard the server starved was hung up on after about RESTORER_HTTP_STALL_S (2 s)
    of waiting: from its request to curl's end, not sooner, and under 3 times the limit (a busy
    machine's slack; a limit ignored 4 times over would take 8 s)."""
    assert len(seconds) == reads, (seconds, reads)
    assert all(1.5 <= s < 6 for s in seconds), seconds


@pytest.mark.slow
@pytest.mark.parametrize("sent", [None, 0, 3000])
def test_a_stalled_server_is_abandoned_after_the_stall_limit(folder, capfd, sent):
    """None: the request is read and never answered; 0: headers only; 3000: headers and 3000 bytes
    of the shard, then nothing. With RESTORER_HTTP_STALL_S=2 each read of that shard gives up
    after 2 s of waiting (60 by default), and is not asked again (a 5xx would be)."""
    bad = "train-000000.tar"
    with ShardServer(folder, {bad: ("stall", sent)}) as server:
        epochs, _ = _epochs(_cfg(server.url(PATTERN)))
        url, hits, gone = server.url(bad), server.hits[bad], server.gone[bad]
    assert [len(e) for e in epochs] == [STEPS]
    lines = _skips(capfd.readouterr().err, url)
    stalled = lines and re.search(r"HttpShardError: too slow: (\d+) bytes in the 2 s the reader waited, under 1024 bytes/s "
                                  r"\(RESTORER_HTTP_STALL_S=2, RESTORER_HTTP_MIN_RATE=1024\) \(1 skipped so far by rank 0 "
                                  r"worker 0\)$", lines[0])
    assert stalled and int(stalled.group(1)) <= (sent or 0), lines
    assert 1 <= hits <= 3 and len(lines) == hits  # one request, one count per read of it
    _gone_after_the_stall_limit(gone, hits)


@pytest.mark.slow
def test_a_trickling_server_is_abandoned_after_the_stall_limit(folder, capfd):
    """A byte every 0.3 s: about 3 bytes/s, under RESTORER_HTTP_MIN_RATE (1024 bytes/s by default).
    Each read of that shard ends after 2 s of waiting (RESTORER_HTTP_STALL_S=2) with one warning
    line, and the epoch goes on from the other shards. (curl's own --speed-limit, 1 byte/s, never
    caught it: the worker and curl read on for as long as the server trickled.)"""
    bad = "train-000000.tar"
    with ShardServer(folder, {bad: ("trickle",)}) as server:
        epochs, _ = _epochs(_cfg(server.url(PATTERN)))
        url, hits, gone = server.url(bad), server.hits[bad], server.gone[bad]
    assert [len(e) for e in epochs] == [STEPS]
    err = capfd.readouterr().err
    lines = _skips(err, url)
    assert len(lines) == hits and all(line in err.splitlines() for line in lines)
    trickled = re.search(r"HttpShardError: too slow: (\d+) bytes in the 2 s the reader waited, under 1024 bytes/s "
                         r"\(RESTORER_HTTP_STALL_S=2, RESTORER_HTTP_MIN_RATE=1024\) \(1 skipped so far", lines[0])
    assert trickled and int(trickled.group(1)) > 0  # bytes came: a trickle, not a stall
    _gone_after_the_stall_limit(gone, hits)


def _descendants(pid: int) -> dict[int, tuple[str, int]]:
    """{pid: (name, parent pid)} of every process under `pid`."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        table[int(entry)] = (stat[stat.index("(") + 1: stat.rindex(")")], int(stat[stat.rindex(")") + 2:].split()[1]))
    found, frontier = {}, {pid}
    while frontier:
        frontier = {p for p, (_, parent) in table.items() if parent in frontier}
        found.update({p: table[p] for p in frontier})
    return found


def _ends_within(pid: int, seconds: float) -> bool:
    """Whether process `pid` (not a child of this one) ends within `seconds`: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


@pytest.mark.slow
def test_a_killed_trainer_leaves_no_loader_worker_and_no_curl_behind(folder, tmp_path, monkeypatch):
    """The trainer's loader worker waits on a shard whose server sent its headers and then nothing
    (and would wait 60 s before judging it); the trainer is killed (SIGKILL: nothing of it runs
    after). Its worker and the worker's curl end with it."""
    monkeypatch.setenv("RESTORER_HTTP_STALL_S", "60")
    shards = [f"train-{i:06d}.tar" for i in range(3)]
    with ShardServer(folder, {name: ("stall", 0) for name in shards}) as server:
        log = (tmp_path / "train.log").open("w")
        trainer = subprocess.Popen(train_cmd(0, folder, tmp_path / "run", f"data.train_urls={server.url(PATTERN)}"),
                                   stdout=log, stderr=subprocess.STDOUT, env=train_env())
        left = []
        try:
            assert server.asked.wait(180), f"the trainer never asked for a shard:\n{(tmp_path / 'train.log').read_text()}"
            under = _descendants(trainer.pid)
            curls = [pid for pid, (name, _) in under.items() if name == "curl"]
            assert len(curls) == 1, under
            worker = under[curls[0]][1]
            assert under[worker][1] == trainer.pid  # curl is the worker's, the worker the trainer's
            left = [worker, curls[0]]
            trainer.kill()
            trainer.wait()
            assert _ends_within(worker, 15), "the loader worker outlived the killed trainer"
            assert _ends_within(curls[0], 15), "curl outlived the killed trainer and its worker"
        finally:
            for pid in left:  # (a failed test leaves nothing running)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait()
            log.close()


# ----------------------------------------------------------------------------- https and passwords


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files): made with the cryptography
    package, or the openssl command where the package is not installed."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def test_an_https_shard_whose_certificate_is_not_trusted_says_why_in_one_line(folder, capfd, certificate, monkeypatch):
    """curl's message is 5 lines, the cause on the first and "please visit the web page mentioned
    above" on the last: the warning is the cause, and the remedy. With the certificate trusted the
    shard reads."""
    with ShardServer(folder, tls=certificate) as server:
        url = server.url("train-000000.tar")
        images, _ = _deadline(lambda: list(read_images([url], SkipLog("the test"))), "an untrusted https shard")
        assert images == []
        err = capfd.readouterr().err
        assert len(err.splitlines()) == 1 and re.fullmatch(  # (OpenSSL 1.1 writes "self signed")
            re.escape(f"restorer: warning: skipped shard {url}: HttpShardError: curl: (60) SSL certificate problem: self")
            + "[- ]" + re.escape("signed certificate (trust its certificate with CURL_CA_BUNDLE=/path/to/ca.pem) "
                                 "(1 skipped so far by the test)\n"), err), err
        monkeypatch.setenv("CURL_CA_BUNDLE", str(certificate[0]))
        images, _ = _deadline(lambda: list(read_images([url], SkipLog("the test"))), "a trusted https shard")
        assert len(images) == 4 and capfd.readouterr().err == ""


SECRET = "s3cret"


def test_a_password_in_a_shard_url_is_on_no_command_line_and_in_no_warning(folder, capfd):
    """A server that wants Basic auth (user:s3cret): the shards read with the password in their URLs,
    which curl gets on its stdin: while one request is held by the server, the curl reading it has no
    URL on its command line (/proc/PID/cmdline, what `ps` shows every user). The warnings of a
    missing shard name it with the password masked."""
    held, missing = "train-000001.tar", "train-000002.tar"
    with ShardServer(folder, {held: ("hold",), missing: ("status", 404)}, auth=("user", SECRET)) as server:
        loaded: list = []
        loading = threading.Thread(target=lambda: loaded.append(_epochs(_cfg(server.url(PATTERN)))), daemon=True)
        loading.start()
        try:
            assert server.held.wait(DEADLINE_S), "the held shard was never asked for"
            curls = _curls()
            command_lines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in curls]
        finally:
            server.go_on.set()
            loading.join(DEADLINE_S)
        (epochs, _), = loaded
        url = server.url(missing)
        assert server.unauthorized == 0 and server.hits[held] >= 1  # every request carried the password
    assert [len(e) for e in epochs] == [STEPS]
    assert len(command_lines) == 1 and command_lines[0][0] == b"curl", command_lines  # the one reading the held shard
    assert not any(SECRET.encode() in arg or b"127.0.0.1" in arg for arg in command_lines[0]), command_lines
    err = capfd.readouterr().err
    masked = url.replace(f":{SECRET}@", ":***@")
    assert _skips(err, masked) and SECRET not in err


def test_a_run_on_shards_behind_a_password_keeps_it_out_of_config_yaml_and_the_console(folder, tmp_path, capfd):
    with ShardServer(folder, auth=("user", SECRET)) as server:
        p = train_here(folder, tmp_path / "run", f"data.train_urls={server.url(PATTERN)}", "train.max_steps=2")
        assert server.unauthorized == 0 and sum(server.hits.values()) >= 1
    assert_ok(p)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"train_urls: http://user:***@127.0.0.1:{server.httpd.server_address[1]}/{PATTERN}" in saved
    assert SECRET not in saved + p.stdout + p.stderr + capfd.readouterr().err


def test_http_settings_are_checked(monkeypatch):
    assert loader.http_settings() == (2, loader.HTTP_RETRIES, loader.HTTP_MIN_RATE)
    monkeypatch.delenv("RESTORER_HTTP_STALL_S")
    assert loader.http_settings() == (loader.HTTP_STALL_S, loader.HTTP_RETRIES, loader.HTTP_MIN_RATE) == (60, 2, 1024)
    monkeypatch.setenv("RESTORER_HTTP_MIN_RATE", "0")
    assert loader.http_settings().min_rate == 0
    monkeypatch.setenv("RESTORER_HTTP_MIN_RATE", "1 KiB")
    with pytest.raises(ValueError, match="RESTORER_HTTP_MIN_RATE: must be a whole number of bytes/s >= 0, got '1 KiB'"):
        loader.http_settings()
    monkeypatch.setenv("RESTORER_HTTP_RETRIES", "-1")
    with pytest.raises(ValueError, match="RESTORER_HTTP_RETRIES: must be a whole number of tries >= 0, got '-1'"):
        loader.http_settings()
    monkeypatch.setenv("RESTORER_HTTP_STALL_S", "soon")
    with pytest.raises(ValueError, match="RESTORER_HTTP_STALL_S: must be a whole number of seconds >= 1, got 'soon'"):
        loader.http_settings()
