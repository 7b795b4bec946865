"""The inference server (server.py) and its client (remote.py), on loopback, with a self-signed certificate made here.

Why these tests: a server on a hospital network is a door; each refusal below (no TLS off loopback, wrong token,
untrusted certificate, oversized or malformed uploads, paths in options, the concurrency limit) is checked on a real
uvicorn process, and so are the faults a clinician meets (unreachable, killed mid-run, cancel) and that a remote
result is the local result voxel for voxel. Servers run as subprocesses; every loop is bounded in count and time.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import small_head, wait_until

from MIADeepLearningLib import jobs, remote, runner

SERVER_START_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `python -m MIADeepLearningLib serve` subprocess; its output goes to a log file the tests read."""

    def __init__(self, folder: Path, *args: str, tls: tuple[Path, Path] | None = None, env: dict | None = None):
        self.folder = folder
        self.token = secrets.token_urlsafe(32)
        token_file = folder / "token"
        token_file.write_text(self.token + "\n", encoding="utf-8")
        self.port = _free_port()
        self.root = folder / "root"
        self.log_path = folder / "server.log"
        command = [sys.executable, "-m", "MIADeepLearningLib", "serve", "--host", "127.0.0.1", "--port",
                   str(self.port), "--token-file", str(token_file), "--root", str(self.root), *args]
        self.ca_file = None
        if tls:
            command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
            self.ca_file = str(tls[0])
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=folder,
                                        env=runner.worker_environment(env), start_new_session=True)
        self.client = remote.RemoteServer(self.url, self.token, ca_file=self.ca_file)
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                self.health = self.client.health()
                break
            except remote.RemoteError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"server did not start:\n{self.log()}") from None
                time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def job_folders(self) -> list[str]:
        return sorted(path.name for path in self.root.glob("job-*")) if self.root.exists() else []

    def stop(self) -> None:
        children = self.children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for child in children:  # a worker left by a killed server (its own session): end it
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()


def raw(server: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
        token: str | None = "default", chunked: bool = False) -> tuple[int, dict]:
    """One request without the client's checks: (status, JSON answer)."""
    context = ssl.create_default_context(cafile=server.ca_file) if server.ca_file else None
    connection = (http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30) if context
                  else http.client.HTTPConnection("127.0.0.1", server.port, timeout=30))
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {server.token if token == 'default' else token}"
    try:
        if chunked:
            connection.putrequest(method, path)
            for name, value in {**headers, "Transfer-Encoding": "chunked"}.items():
                connection.putheader(name, value)
            connection.endheaders()
            try:
                for start in range(0, len(body or b""), 1 << 20):
                    piece = body[start:start + (1 << 20)]
                    connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                connection.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            try:
                connection.request(method, path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                pass
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(data) if data else {}
    except ValueError:
        return response.status, {"raw": data[:200].decode("latin-1")}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1 (openssl command line)."""
    if shutil.which("openssl") is None:
        if os.environ.get("MIADL_REQUIRE_ALL"):
            pytest.fail("prerequisite missing in CI: the openssl command")
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def server(tmp_path_factory, tls_files):
    """The TLS server most tests share: 2 warm workers, 2 jobs at once, 8 MB uploads."""
    running = Server(tmp_path_factory.mktemp("server"), "--max-concurrent", "2", "--warm-workers", "2",
                     "--max-upload-mb", "8", tls=tls_files)
    yield running
    running.stop()
    log = running.log()
    assert running.token not in log and "Bearer" not in log and "Authorization" not in log, \
        "the token reached the server's log"
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def hanging_server(tmp_path_factory):
    """A plain-HTTP loopback server whose workers hang while loading a model (cancel and kill mid-run)."""
    running = Server(tmp_path_factory.mktemp("hang"), "--max-concurrent", "4",
                     env={"MIADL_WORKER_FAULT": "hang:load_model"})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def head_nrrd(robex, tmp_path_factory) -> Path:
    import SimpleITK as sitk

    path = tmp_path_factory.mktemp("head") / "head.nrrd"
    sitk.WriteImage(small_head(robex[0]), str(path))
    return path


def _read(path) -> tuple[np.ndarray, tuple]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), (image.GetOrigin(), image.GetSpacing(), image.GetDirection())


# --------------------------------------------------------------------------------------------- start-up refusals


def test_refuses_to_serve_off_loopback_without_tls(tmp_path):
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "MIADeepLearningLib", "serve", "--host", "0.0.0.0", "--port", "1",
                           "--token-file", str(token)], capture_output=True, text=True, timeout=60,
                          env=runner.worker_environment())
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "not a loopback address" in done.stderr and "--tls-cert" in done.stderr


def test_client_refuses_plain_http_to_another_computer():
    with pytest.raises(remote.RemoteError, match="https://"):
        remote.RemoteServer("http://192.0.2.10:8443", "t" * 20)
    with pytest.raises(remote.RemoteError, match="token"):
        remote.RemoteServer("https://192.0.2.10:8443/?token=abc", "t" * 20)


def test_unreachable_server_is_one_sentence():
    client = remote.RemoteServer(f"http://127.0.0.1:{_free_port()}", "t" * 20)
    with pytest.raises(remote.RemoteError, match=r"cannot be reached \(Connection refused\)\.$"):
        client.health()
    job = client.submit("device", "", {})
    final = job.wait()
    assert job.state == runner.STATE_ERROR and "cannot be reached" in final.message


# --------------------------------------------------------------------------------------------- token and TLS


def test_health_over_tls(server):
    health = server.client.health()
    assert health["version"] and health["device"]["summary"].startswith(("CPU", "CUDA"))
    assert "connected" in server.client.describe(health).lower()
    assert "import" not in health["tasks"] and "segment" in health["tasks"]


def test_wrong_or_missing_token_is_refused(server):
    wrong = remote.RemoteServer(server.url, "x" * 32, ca_file=server.ca_file)
    with pytest.raises(remote.RemoteError, match="did not accept the token"):
        wrong.health()
    assert raw(server, "GET", "/v1/health", token=None)[0] == 401
    assert raw(server, "GET", f"/v1/health?token={server.token}", token=None)[0] == 401  # never from a URL
    assert raw(server, "GET", "/v1/health", headers={"Authorization": f"Basic {server.token}"}, token=None)[0] == 401
    job = wrong.submit("device", "", {})
    assert "did not accept the token" in job.wait().message


def test_untrusted_certificate_is_refused(server, tmp_path):
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k"),
                    "-out", str(other), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    for client in (remote.RemoteServer(server.url, server.token, ca_file=str(other)),
                   remote.RemoteServer(server.url, server.token)):
        with pytest.raises(remote.RemoteError, match=r"TLS certificate .* could not be verified"):
            client.health()
    plain = remote.RemoteServer(f"http://127.0.0.1:{server.port}", server.token)
    with pytest.raises(remote.RemoteError):
        plain.health()


# --------------------------------------------------------------------------------------------- what is sent


def test_clean_header_keeps_geometry_only(tmp_path):
    path = tmp_path / "named.nrrd"
    header = ("NRRD0004\n# Complete NRRD file format specification at:\ncontent: Doe^John\ntype: uint8\n"
              "dimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\nspace directions: (1,0,0) (0,1,0) "
              "(0,0,1)\nkinds: domain domain domain\nencoding: raw\nspace origin: (0,0,0)\n"
              "DICOM.PatientName:=Doe^John\nPatientID:=PID-12345\n\n")
    path.write_bytes(header.encode() + bytes(range(8)))
    clean, offset = remote.clean_nrrd_header(path)
    assert b"Doe" not in clean and b"PID" not in clean and b"#" not in clean and b"content" not in clean
    assert b"space directions: (1,0,0) (0,1,0) (0,0,1)" in clean and path.read_bytes()[offset:] == bytes(range(8))
    (tmp_path / "detached.nhdr").write_text("NRRD0004\ntype: uint8\ndimension: 1\nsizes: 1\nencoding: raw\n"
                                            "data file: /etc/passwd\n\n")
    with pytest.raises(remote.RemoteError, match="another file"):
        remote.clean_nrrd_header(tmp_path / "detached.nhdr")


# --------------------------------------------------------------------------------------------- bad requests


def _nrrd(sizes=(8, 8, 8), encoding="raw", data: bytes | None = None, extra: str = "") -> bytes:
    voxels = data if data is not None else bytes(int(np.prod(sizes)) * 2)
    body = gzip.compress(voxels) if encoding == "gzip" else voxels
    header = (f"NRRD0004\ntype: int16\ndimension: {len(sizes)}\nspace: left-posterior-superior\n"
              f"sizes: {' '.join(map(str, sizes))}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
              f"kinds: domain domain domain\nendian: little\nencoding: {encoding}\nspace origin: (0,0,0)\n{extra}\n")
    return header.encode() + body


def _create(server, **spec) -> str:
    status, answer = raw(server, "POST", "/v1/jobs", json.dumps(
        {"task": "segment", "model": "deepbet", "inputs": ["image"], "outputs": ["label"], **spec}).encode(),
        {"Content-Type": "application/json"})
    assert status == 201, answer
    return answer["job"]


def test_job_descriptions_are_validated(server):
    bad = [
        {"task": "import", "model": "deepbet"},
        {"task": "../worker", "model": "deepbet"},
        {"model": "no-such-model"},
        {"model": "../../etc/passwd"},
        {"model": "thick-slice-sr"},  # a synthesis model for a segment job
        {"inputs": ["../image"]},
        {"inputs": ["image", "fixed"]},
        {"outputs": ["label", "../../x"]},
        {"device": "cuda; rm -rf /"},
        {"options": {"input_name": "Doe^John"}},
        {"options": {"model_options": {"weights": "../../../etc/shadow"}}},
        {"options": {"model_options": {"config": ["/etc/passwd"]}}},
        {"options": {"type_check": "yes"}},
        {"options": {"model_options": {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}}},
    ]
    for change in bad:
        spec = {"task": "segment", "model": "deepbet", "inputs": ["image"], "outputs": ["label"], **change}
        status, answer = raw(server, "POST", "/v1/jobs", json.dumps(spec).encode())
        assert status == 400, (change, answer)
        assert answer["detail"].endswith(".") and answer["detail"].count(". ") == 0, answer
    assert raw(server, "POST", "/v1/jobs", b"{not json")[0] == 400
    assert raw(server, "POST", "/v1/jobs", b"x" * (1 << 20))[0] == 413
    assert raw(server, "GET", "/v1/jobs/../../etc/passwd/events")[0] == 404
    assert raw(server, "GET", "/v1/jobs/%2e%2e%2fetc/events")[0] == 404
    assert server.process.poll() is None and not server.job_folders()


def test_malformed_oversized_and_truncated_uploads_are_refused(server):
    job = _create(server)
    url = f"/v1/jobs/{job}/inputs/image"
    good = _nrrd()
    cases = {
        "not nrrd": (b"P5\n8 8\n255\n" + bytes(64), 400, "not a NRRD"),
        "truncated raw": (good[:-100], 400, "cut short"),
        "truncated gzip": (_nrrd(encoding="gzip")[:-20], 400, "cannot be read"),
        "damaged gzip": (_nrrd(encoding="gzip").replace(b"\x1f\x8b", b"\x00\x00"), 400, ""),
        "detached data": (_nrrd(extra="data file: /etc/passwd\n"), 400, "detached data"),
        "huge header": (_nrrd(sizes=(100000, 100000, 100000), data=bytes(64)), 400, "larger than the server accepts"),
        "header only": (b"NRRD0004\ntype: int16\n", 400, "header"),
        "bad sizes": (_nrrd().replace(b"sizes: 8 8 8", b"sizes: 8 x 8"), 400, "whole numbers"),
        "empty": (b"", 400, "not a NRRD"),
    }
    for name, (body, status, text) in cases.items():
        got, answer = raw(server, "PUT", url, body)
        assert got == status and text in answer.get("detail", ""), (name, got, answer)
    big = bytes(9 << 20)
    started = time.monotonic()
    assert raw(server, "PUT", url, big)[0] == 413  # Content-Length beyond the limit: refused before reading it
    got, answer = raw(server, "PUT", url, big, chunked=True)  # no length: refused while streaming
    assert got == 413 and "8 MB" in answer["detail"], answer
    assert time.monotonic() - started < 20
    assert raw(server, "PUT", f"/v1/jobs/{job}/inputs/label", good)[0] == 404  # not an input role of the job
    assert raw(server, "POST", f"/v1/jobs/{job}/start")[0] == 409  # nothing valid uploaded
    assert raw(server, "PUT", url, good)[0] == 204
    assert sorted(path.name for path in (server.root / server.job_folders()[0]).iterdir()) == ["input_image.nrrd"]
    assert raw(server, "DELETE", f"/v1/jobs/{job}")[0] == 200
    assert server.process.poll() is None and server.client.health()["active"] == 0
    assert not server.job_folders()


def test_client_names_the_upload_limit(server, tmp_path):
    big = tmp_path / "big.nrrd"
    big.write_bytes(_nrrd(sizes=(160, 160, 200)))  # 10 MB > 8 MB
    job = server.client.submit("segment", "deepbet", {"image": str(big)}, outputs={"label": "label.nrrd"})
    final = job.wait()
    assert job.state == runner.STATE_ERROR and "larger than the server accepts (8 MB)" in final.message
    assert server.client.health()["active"] == 0  # the refused job gave its place back


def test_limit_reached_is_429_with_one_sentence(server):
    first, second = _create(server), _create(server)
    status, answer = raw(server, "POST", "/v1/jobs", json.dumps(
        {"task": "device", "model": "", "inputs": [], "outputs": []}).encode())
    assert status == 429 and answer["detail"] == ("The server is already running its limit of 2 job(s); try again "
                                                   "when one has finished.")
    job = server.client.submit("device", "", {})
    assert "limit of 2 job(s)" in job.wait().message
    for job_id in (first, second):
        assert raw(server, "DELETE", f"/v1/jobs/{job_id}")[0] == 200
    assert server.client.submit("device", "", {}).wait().stage == jobs.STAGE_DONE


# --------------------------------------------------------------------------------------------- real runs


def test_remote_brain_extraction_equals_local(server, head_nrrd, tmp_path):
    local_job = jobs.Job(task="segment", model="deepbet", inputs={"image": str(head_nrrd)},
                         folder=str(tmp_path / "local"), outputs={"label": "label.nrrd", "masked": "masked.nrrd"})
    local = runner.run(local_job)
    assert local.state == runner.STATE_DONE, local.log_lines[-5:]
    events: list[jobs.Event] = []
    job = server.client.submit("segment", "deepbet", {"image": str(head_nrrd)}, device="auto",
                               outputs={"label": "label.nrrd", "masked": "masked.nrrd"}, folder=tmp_path / "remote",
                               on_event=events.append)
    final = job.wait()
    assert job.state == runner.STATE_DONE, (final.message, job.log_lines[-5:])
    stages = [event.stage for event in events]
    assert stages[0] == "upload" and "inference" in stages and stages[-1] == "done"
    for role in ("label", "masked"):
        remote_path = Path(final.result["outputs"][role])
        assert remote_path.parent == Path(job.job.outputs_dir) and remote_path.is_file()
        (local_array, local_grid), (remote_array, remote_grid) = _read(local.final_event.result["outputs"][role]), \
            _read(remote_path)
        assert np.array_equal(local_array, remote_array) and local_grid == remote_grid, role
    assert final.result["segments"] == local.final_event.result["segments"]
    assert final.result["provenance"]["remote"] == {"server": server.url, "version": server.health["version"],
                                                    "device": server.health["device"]["summary"]}
    text = json.dumps(final.result) + "\n".join(job.log_lines)
    assert server.token not in text and str(server.root) not in json.dumps(final.result["outputs"])
    assert wait_until(lambda: not server.job_folders(), 5)  # fetched: removed on the server


def test_task_run_imports_a_remote_result_and_sends_no_names(server, scene, head_nrrd, tmp_path, monkeypatch):
    """What a module does with Device "remote": SegmentationLogic with the server (mrml/task_run.launch hands the job
    to start_remote), imported by the unchanged TaskRun; no name or DICOM field leaves the workstation."""
    from MIADeepLearningLib.mrml.provenance import get_provenance
    from MIADeepLearningLib.mrml.segmentation_logic import SegmentationLogic
    from MIADeepLearningLib.mrml.volumes import read_volume_file

    node = read_volume_file(head_nrrd, "Doe^John 1960-01-01")
    secrets_of_node = {"DICOM.PatientName": "Doe^John", "DICOM.PatientID": "PID-12345",
                       "DICOM.StudyDate": "19991231", "DICOM.instanceUIDs": "1.2.826.0.1.3680043.2.1125.777"}
    for name, value in secrets_of_node.items():
        node.SetAttribute(name, value)
    sent: list[bytes] = []
    original_send = http.client.HTTPConnection.send

    def record(self, data):
        sent.append(bytes(data) if isinstance(data, (bytes, bytearray)) else str(data).encode())
        return original_send(self, data)

    monkeypatch.setattr(http.client.HTTPConnection, "send", record)
    events: list[jobs.Event] = []
    jobs_root = tmp_path / "remote-jobs"
    logic = SegmentationLogic(jobs_root=jobs_root, remote_server=server.client)
    result = logic.run(node, "deepbet", device="remote", on_event=events.append)
    segmentation = result.segmentation_node
    assert segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() >= 1
    provenance = get_provenance(result.segmentation_node)
    assert provenance["remote"]["server"] == server.url and server.token not in json.dumps(provenance)
    assert not list(jobs_root.iterdir())  # TaskRun removed the local job folder as for a local run
    body = b"".join(sent)
    assert len(body) > 100_000  # the voxels went
    for secret in [node.GetName(), *secrets_of_node.values()]:
        assert secret.encode() not in body, secret
    assert events[-1].stage == "done"


def test_cancel_mid_run(hanging_server, head_nrrd):
    events: list[jobs.Event] = []
    job = hanging_server.client.submit("segment", "deepbet", {"image": str(head_nrrd)}, on_event=events.append)
    assert wait_until(lambda: job.poll() is not None and any(e.stage == "load_model" for e in events), 60)
    workers = hanging_server.children()
    assert workers and hanging_server.job_folders()
    job.cancel()
    assert job.state == runner.STATE_CANCELLED and job.final_event.message == "Cancelled by the user."
    assert not Path(job.job.outputs_dir).exists()
    assert wait_until(lambda: not hanging_server.job_folders(), 10)
    assert wait_until(lambda: not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE
                                      for child in workers), 10)
    assert hanging_server.client.health()["active"] == 0


def test_server_killed_mid_run(tmp_path, head_nrrd):
    server = Server(tmp_path, env={"MIADL_WORKER_FAULT": "hang:load_model"})
    workers: list[psutil.Process] = []
    try:
        events: list[jobs.Event] = []
        job = server.client.submit("segment", "deepbet", {"image": str(head_nrrd)}, on_event=events.append)
        assert wait_until(lambda: job.poll() is not None and any(e.stage == "load_model" for e in events), 60)
        workers = server.children()
        server.process.kill()
        started = time.monotonic()
        final = job.wait()
        assert time.monotonic() - started < 15
        assert job.state == runner.STATE_ERROR
        assert final.message == (f"The connection to the server at {server.url} was lost while the job was running; "
                                 "the run was abandoned and nothing was imported.")
        assert not Path(job.job.outputs_dir).exists()
    finally:
        for child in workers:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        server.stop()


# --------------------------------------------------------------------------------------------- load


CLIENTS, JOBS_PER_CLIENT, LOAD_DEADLINE_S = 20, 5, 150.0


def test_load_20_clients_5_jobs_each(server):
    """Every job ends with a correct result (429 answers are retried, bounded), the server does not crash, and its
    memory comes back near where it started."""
    warm = server.client.submit("device", "", {}).wait()  # warm workers up, torch imported
    assert warm.stage == jobs.STAGE_DONE
    torch_version = warm.result["report"]["torch"]
    process = psutil.Process(server.process.pid)
    rss_before = process.memory_info().rss
    deadline = time.monotonic() + LOAD_DEADLINE_S
    results: dict[int, list] = {client: [] for client in range(CLIENTS)}
    problems: list[str] = []

    def client_loop(index: int) -> None:
        client = remote.RemoteServer(server.url, server.token, ca_file=server.ca_file)
        rng = random.Random(index)
        for attempt in range(200):  # bounded in count ...
            if len(results[index]) == JOBS_PER_CLIENT or time.monotonic() > deadline:  # ... and in time
                return
            job = client.submit("device", "", {}, timeout_s=60)
            final = job.wait(poll_interval_s=0.02)
            if job.state == runner.STATE_DONE:
                results[index].append(final.result)
            elif "limit of 2 job(s)" in final.message:
                time.sleep(rng.uniform(0.05, 0.3))
            else:
                problems.append(f"client {index} attempt {attempt}: {final.message}")
                return
            shutil.rmtree(job.job.folder, ignore_errors=True)

    threads = [threading.Thread(target=client_loop, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=LOAD_DEADLINE_S + 30)
    assert not problems, problems[:5]
    assert all(len(done) == JOBS_PER_CLIENT for done in results.values()), {k: len(v) for k, v in results.items()}
    for done in results.values():
        for result in done:
            assert result["report"]["torch"] == torch_version and result["provenance"]["remote"]["server"] == server.url
    assert server.process.poll() is None and server.client.health()["active"] == 0
    assert wait_until(lambda: not server.job_folders(), 10)
    rss_after = process.memory_info().rss
    retries = sum(line.count("POST /v1/jobs HTTP/1.1\" 429") for line in server.log().splitlines())
    print(f"load: {CLIENTS * JOBS_PER_CLIENT} jobs in {time.monotonic() - deadline + LOAD_DEADLINE_S:.1f} s, "
          f"{retries} answers 429 (retried), server RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MB")
    assert rss_after - rss_before < 40 * 2**20, (rss_before / 2**20, rss_after / 2**20)
    assert server.token not in server.log()
