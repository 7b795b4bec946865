"""What running brain extraction on the inference server (loopback) adds to a local run, for a 256³ head.

Prints a table (never asserts on time): the median wall time of N local runs (a worker process per run, as Slicer
does by default) and of N remote runs through `remote.RemoteServer.submit` (upload, the same kind of worker on the
server, event polling, download with sha256 check), over plain HTTP and over TLS with a self-signed certificate,
with a fresh worker per job on the server and with one warm worker. Why: issue 19's target is "adds < 1 s".

Usage: python Testing/Benchmarks/remote_overhead.py [--runs N] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MIADeepLearning"))

from MIADeepLearningLib import jobs, remote, runner
from MIADeepLearningLib.engine.devices import cpu_name


def head_256(folder: Path) -> Path:
    """The ROBEX head resampled onto a 256³ grid covering the same box (float32 NRRD, 64 MB)."""
    import SimpleITK as sitk

    from MIADeepLearningLib.testing import sample_data

    head = sitk.ReadImage(str(sample_data.robex_head_paths()[0]))
    extent = [n * s for n, s in zip(head.GetSize(), head.GetSpacing())]
    reference = sitk.Image([256] * 3, sitk.sitkFloat32)
    reference.SetSpacing([e / 256 for e in extent])
    reference.SetOrigin(head.GetOrigin())
    reference.SetDirection(head.GetDirection())
    image = sitk.Resample(sitk.Cast(head, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    path = folder / "head256.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def start_server(folder: Path, tls: bool, warm: int) -> tuple[subprocess.Popen, remote.RemoteServer]:
    folder.mkdir(parents=True)
    token = secrets.token_urlsafe(32)
    (folder / "token").write_text(token, encoding="utf-8")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "MIADeepLearningLib", "serve", "--port", str(port), "--token-file",
               str(folder / "token"), "--root", str(folder / "root"), "--warm-workers", str(warm)]
    ca_file = None
    if tls:
        cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        command += ["--tls-cert", str(cert), "--tls-key", str(key)]
        ca_file = str(cert)
    log = open(folder / "server.log", "wb")  # the server's, for its lifetime
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=runner.worker_environment(),
                               start_new_session=True)
    client = remote.RemoteServer(f"{'https' if tls else 'http'}://127.0.0.1:{port}", token, ca_file=ca_file)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.health()
            return process, client
        except remote.RemoteError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((folder / "server.log").read_text()) from None
            time.sleep(0.2)


OUTPUTS = {"label": "label.nrrd", "masked": "masked.nrrd"}


def local_run(head: Path, folder: Path, device: str) -> tuple[float, float]:
    started = time.perf_counter()
    worker = runner.run(jobs.Job(task="segment", model="deepbet", inputs={"image": str(head)}, folder=str(folder),
                                 outputs=dict(OUTPUTS), device=device))
    seconds = time.perf_counter() - started
    assert worker.state == runner.STATE_DONE, worker.final_event.message
    shutil.rmtree(folder, ignore_errors=True)
    return seconds, worker.final_event.result["timings"]["worker_total"]


def remote_run(client: remote.RemoteServer, head: Path, folder: Path, device: str) -> tuple[float, float]:
    started = time.perf_counter()
    job = client.submit("segment", "deepbet", {"image": str(head)}, device=device, outputs=dict(OUTPUTS),
                        folder=folder)
    final = job.wait(poll_interval_s=0.01)
    seconds = time.perf_counter() - started
    assert job.state == runner.STATE_DONE, final.message
    shutil.rmtree(folder, ignore_errors=True)
    return seconds, final.result["timings"]["worker_total"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="miadl-remote-bench-"))
    load_before = os.getloadavg()
    servers = []
    try:
        head = head_256(work)
        configurations = [("plain HTTP, new worker per job", False, 0), ("TLS, new worker per job", True, 0),
                          ("TLS, 1 warm worker", True, 1)]
        for name, tls, warm in configurations:
            servers.append((name, *start_server(work / f"server{len(servers)}", tls, warm)))
        times: dict[str, list[tuple[float, float]]] = {"local (worker process per run)": []}
        for name, _, client in servers:
            times[f"remote, {name}"] = []
            remote_run(client, head, work / "warmup", args.device)  # warm-up: page cache, warm worker's model
        for run in range(args.runs):
            times["local (worker process per run)"].append(local_run(head, work / f"local{run}", args.device))
            for name, _, client in servers:
                times[f"remote, {name}"].append(remote_run(client, head, work / f"remote{run}", args.device))
    finally:
        for _, process, _ in servers:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    local = statistics.median(wall for wall, _ in times["local (worker process per run)"])
    local_outside = statistics.median(wall - inside for wall, inside in times["local (worker process per run)"])
    print(f"Remote brain extraction (deepbet) on loopback, 256^3 float32 head (64 MB), device {args.device}, "
          f"median of {args.runs}")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; load average before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}")
    print("wall: submit to result on disk; outside: wall minus the worker's own time (process start, upload, polling,"
          " download), less sensitive to other load")
    print(f"{'run':<40} {'wall s':>7} {'min s':>6} {'max s':>6} {'vs local':>9} {'outside s':>10} {'vs local':>9}")
    for name, values in times.items():
        walls = [wall for wall, _ in values]
        median = statistics.median(walls)
        outside = statistics.median(wall - inside for wall, inside in values)
        print(f"{name:<40} {median:>7.2f} {min(walls):>6.2f} {max(walls):>6.2f} {median - local:>+9.2f} "
              f"{outside:>10.2f} {outside - local_outside:>+9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
