"""Model registry schema, verified downloads and model package import/installation (torch-free, no internet).

Every download goes to a local HTTP server these tests start on 127.0.0.1 (normal, slow, truncated with and
without Range support, stalled, tampered, 404). The model cache is redirected to tmp_path ($MIADL_CACHE_DIR), and
registries with a downloadable model are copies of Resources/Models in tmp_path ($MIADL_RESOURCES_DIR).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import SHIPPED_IDS

from MIADeepLearningLib import paths
from MIADeepLearningLib.engine import downloads, model_store, registry
from MIADeepLearningLib.engine.errors import ModelError

SOURCE_MODELS = Path(__file__).resolve().parents[2] / "Resources" / "Models"
TINY_ID, TINY_VERSION = "tinybet", "0.1.0"


def _one_sentence(message: str) -> bool:
    """One line, ends with a full stop, and no second sentence inside it."""
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------- local server


@dataclass
class Route:
    """What the server sends for one path."""

    data: bytes
    ranges: bool = True  # honour "Range: bytes=N-" with 206
    truncate_first: bool = False  # first answer announces everything, sends half, closes the connection
    stall_first: float = 0.0  # first answer sends half, then stalls this long
    delay: float = 0.0  # before the status line
    chunk: int = 64 << 10
    pause: float = 0.0  # between chunks (slow server)
    tamper: bool = False  # same size, one byte changed
    length: int | None = None  # announced Content-Length override
    hits: int = 0


@dataclass
class Server:
    url: str
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def serve(self, path: str, data: bytes, **options) -> str:
        self.routes[path] = Route(data, **options)
        return self.url + path

    def ranges_asked(self, path: str) -> list[str | None]:
        return [header for asked, header in self.requests if asked == path]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that time out on purpose break pipes
        pass


def _handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            server.requests.append((self.path, self.headers.get("Range")))
            route = server.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            first, route.hits = route.hits == 0, route.hits + 1
            time.sleep(route.delay)
            data = bytearray(route.data)
            if route.tamper:
                data[len(data) // 2] ^= 0xFF
            start, asked = 0, self.headers.get("Range")
            if asked and route.ranges and asked.startswith("bytes=") and asked.endswith("-"):
                start = int(asked[len("bytes="):-1])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = bytes(data[start:])
            self.send_header("Content-Length", str(route.length if route.length is not None else len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if first and (route.truncate_first or route.stall_first):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(route.stall_first)
                return
            for offset in range(0, len(body), route.chunk):
                self.wfile.write(body[offset:offset + route.chunk])
                self.wfile.flush()
                time.sleep(route.pause)

    return Handler


@pytest.fixture(scope="module")
def http_server():
    server = Server(url="")
    httpd = _QuietServer(("127.0.0.1", 0), _handler(server))
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(http_server):
    http_server.routes.clear()
    http_server.requests.clear()
    return http_server


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A private model cache; no extra model folders."""
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(registry.EXTRA_MODELS_ENV, raising=False)
    return tmp_path / "cache" / "models"


def _cache_contents(cache: Path) -> list[str]:
    """Every file left in the model cache, as relative paths."""
    if not cache.exists():
        return []
    return sorted(path.relative_to(cache).as_posix() for path in cache.rglob("*") if path.is_file())


# ------------------------------------------------------------------------------------------------ tiny packages


def make_package(root: Path, model_id: str | None = TINY_ID, version: str = TINY_VERSION, seed: int = 0) -> Path:
    """deepbet's metadata with two small weight files inside the package ("source": package)."""
    package = root / (model_id or "unnamed-package")
    shutil.copytree(SOURCE_MODELS / "deepbet" / "configs", package / "configs")
    shutil.copytree(SOURCE_MODELS / "deepbet" / "docs", package / "docs")
    shutil.copyfile(SOURCE_MODELS / "deepbet" / "LICENSE", package / "LICENSE")
    metadata_path = package / registry.METADATA_RELATIVE_PATH
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    metadata["version"] = version
    metadata["slicer"]["title"] = "Tiny brain extraction (test package)"
    if model_id:
        metadata["slicer"]["id"] = model_id
    (package / "models").mkdir()
    for index, entry in enumerate(metadata["slicer"]["files"]):
        data = bytes((seed + index + i) % 251 for i in range(40_000 + 1000 * index))
        relative = f"models/{Path(entry['path']).name}"
        (package / relative).write_bytes(data)
        entry.update(path=relative, sha256=_sha256(data), size=len(data), source={"type": "package"})
    metadata_path.write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return package


def edit_metadata(package: Path, change) -> None:
    path = package / registry.METADATA_RELATIVE_PATH
    metadata = json.loads(path.read_text(encoding="utf-8"))
    change(metadata)
    path.write_text(json.dumps(metadata), encoding="utf-8")


def make_zip(package: Path, archive: Path, top_folder: bool = True) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(package.rglob("*")):
            relative = path.relative_to(package.parent if top_folder else package).as_posix()
            zipped.write(path, relative)
    return archive


def url_entry(package: Path, url: str, archive: Path) -> dict:
    metadata = json.loads((package / registry.METADATA_RELATIVE_PATH).read_text(encoding="utf-8"))
    data = archive.read_bytes()
    return {
        "id": TINY_ID,
        "title": "Tiny brain extraction (test package)",
        "task": "segmentation",
        "modality": "MR",
        "version": metadata["version"],
        "license": "MIT",
        "citation": "test",
        "source": {"type": "url", "url": url, "sha256": _sha256(data), "size": len(data), "format": "zip"},
        "files": [{key: item[key] for key in ("role", "path", "sha256", "size")}
                  for item in metadata["slicer"]["files"]],
        "inputs": [{"name": "image", "modality": "MR"}],
        "outputs": [{"name": "label", "type": "labelmap", "labels": {"1": "Brain"}}],
        "runtimes": {"cpu_seconds": None, "gpu_seconds": None},
    }


@pytest.fixture
def with_registry(tmp_path, monkeypatch):
    """Install a copy of Resources/Models whose registry also lists the given entries; returns the registry path."""

    def install(*entries: dict, change=None) -> Path:
        resources = tmp_path / "Resources"
        models = resources / "Models"
        shutil.rmtree(models, ignore_errors=True)
        shutil.copytree(SOURCE_MODELS, models)
        registry_path = models / registry.REGISTRY_FILE_NAME
        data = json.loads(registry_path.read_text(encoding="utf-8"))
        data["models"] += list(entries)
        if change:
            change(data)
        registry_path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        monkeypatch.setenv(paths.RESOURCES_ENV, str(resources))
        return registry_path

    return install


@pytest.fixture
def tiny(tmp_path, server, with_registry):
    """A zipped tiny package served at /tinybet.zip and listed in the registry as a url model."""
    package = make_package(tmp_path / "build")
    archive = make_zip(package, tmp_path / "tinybet.zip")
    url = server.serve("/tinybet.zip", archive.read_bytes())
    entry = url_entry(package, url, archive)
    with_registry(entry)
    return package, archive, entry


# ------------------------------------------------------------------------------------------------------ registry


def test_shipped_registry_and_schema_are_valid():
    import jsonschema

    schema = json.loads((SOURCE_MODELS / registry.SCHEMA_FILE_NAME).read_text(encoding="utf-8"))
    jsonschema.validators.validator_for(schema).check_schema(schema)
    data = registry.load_registry(strict=True)
    assert [entry["id"] for entry in data["models"]] == list(SHIPPED_IDS)
    for model in registry.list_models():
        registry.validate(model.metadata, "packageMetadata", str(model.package_dir), strict=True)


def test_builtin_registry_entries_agree_with_their_package_metadata():
    """The registry's files are the pre-download view; the package's slicer.files is the truth: they must agree."""
    checked = 0
    for entry in registry.registry_entries():
        if entry["source"]["type"] not in ("builtin", "pypi"):
            continue
        model = registry.get_model(entry["id"])
        assert registry.disagreement_with_entry(model.metadata, entry) is None
        assert registry.entry_files(entry) == registry.package_files(model.metadata)
        assert all(size is not None for _path, _sha, size in registry.package_files(model.metadata).values())
        keys = ("title", "task", "modality")
        assert [entry[key] for key in keys] == [model.metadata["slicer"][key] for key in keys]
        assert (entry["version"], entry["license"]) == (model.metadata["version"], model.metadata["license"])
        assert entry["citation"] in model.metadata["references"]
        if entry["source"]["type"] == "pypi":
            assert model.pip_requirements_no_deps == [entry["source"]["requirement"]]
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize(
    ("change", "json_path", "phrase"),
    [
        (lambda data: data["models"][0]["source"].pop("package"), "$.models[0].source", "'package' is a required"),
        (lambda data: data["models"][0].update(task="segmentaton"), "$.models[0].task", "is not one of"),
        (lambda data: data["models"][0]["files"][1].update(sha256="abc"), "$.models[0].files[1].sha256", "abc"),
        (lambda data: data["models"][0].update(colour="red"), "$.models[0]", "'colour' was unexpected"),
        (lambda data: data.pop("models"), "$", "'models' is a required property"),
    ],
    ids=["source", "task", "sha256", "unknown-field", "no-models"],
)
def test_registry_that_breaks_the_schema_names_the_json_path(with_registry, change, json_path, phrase):
    with_registry(change=change)
    with pytest.raises(ModelError) as caught:
        registry.list_models()
    message = str(caught.value)
    assert f"at {json_path}:" in message and phrase in message and "models.json" in message
    assert _one_sentence(message), message


def test_url_source_without_sha256_is_refused(tiny, with_registry):
    _package, _archive, entry = tiny
    del entry["source"]["sha256"]
    with_registry(entry)
    index = len(SHIPPED_IDS)  # the added entry comes after the shipped ones
    with pytest.raises(ModelError, match=rf"at \$\.models\[{index}\]\.source: 'sha256' is a required property"):
        registry.list_models()


# ------------------------------------------------------------------------------------------------- download_file


def test_download_lands_in_the_cache_and_verifies(server, cache):
    data = os.urandom(300_000)
    url = server.serve("/weights.bin", data)
    path = downloads.download_file(url, "weights.bin", _sha256(data), size=len(data))
    assert path == cache / "weights.bin" and path.read_bytes() == data
    assert _cache_contents(cache) == ["weights.bin"]
    again = downloads.download_file(url, "weights.bin", _sha256(data).upper(), size=len(data))
    assert again == path and len(server.requests) == 1  # already there and verified: no second request


def test_slow_server_reports_progress_and_verifies(server, tmp_path):
    data = os.urandom(512 << 10)
    url = server.serve("/slow.bin", data, chunk=64 << 10, pause=0.02)
    calls: list[tuple[int, int | None]] = []
    path = downloads.download_file(url, tmp_path / "slow.bin", _sha256(data), progress=lambda *a: calls.append(a),
                                   chunk_size=16 << 10)
    assert path.read_bytes() == data
    assert len(calls) >= 8
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert calls[0] == (0, len(data)) and calls[-1] == (len(data), len(data))  # total from Content-Length


@pytest.mark.parametrize("ranges", [True, False], ids=["resumes-with-range", "server-ignores-range"])
def test_truncated_download_keeps_the_part_and_the_next_attempt_completes(server, tmp_path, ranges):
    data = os.urandom(200_000)
    url = server.serve("/cut.bin", data, truncate_first=True, ranges=ranges)
    destination = tmp_path / "cut.bin"
    part = tmp_path / "cut.bin.part"
    with pytest.raises(ModelError) as caught:
        downloads.download_file(url, destination, _sha256(data), size=len(data))
    message = str(caught.value)
    assert "closed early" in message and "resume" in message and _one_sentence(message), message
    assert not destination.exists() and part.stat().st_size == len(data) // 2

    calls: list[tuple[int, int | None]] = []
    path = downloads.download_file(url, destination, _sha256(data), size=len(data), progress=lambda *a: calls.append(a))
    assert path.read_bytes() == data and not part.exists()
    assert server.ranges_asked("/cut.bin") == [None, f"bytes={len(data) // 2}-"]
    assert calls[0] == ((len(data) // 2 if ranges else 0), len(data))  # resumed, or restarted from zero


def test_stalled_download_times_out_and_resumes(server, tmp_path):
    data = os.urandom(100_000)
    url = server.serve("/stall.bin", data, stall_first=1.0)
    with pytest.raises(ModelError) as caught:
        downloads.download_file(url, tmp_path / "stall.bin", _sha256(data), timeout_s=0.3)
    message = str(caught.value)
    assert "stalled for 0.3 seconds" in message and "resume" in message and _one_sentence(message), message
    assert (tmp_path / "stall.bin.part").stat().st_size == len(data) // 2
    assert downloads.download_file(url, tmp_path / "stall.bin", _sha256(data)).read_bytes() == data


def test_server_that_does_not_answer_times_out(server, tmp_path):
    url = server.serve("/mute.bin", b"x" * 10, delay=1.0)
    with pytest.raises(ModelError) as caught:
        downloads.download_file(url, tmp_path / "mute.bin", _sha256(b"x" * 10), timeout_s=0.3)
    assert "did not answer within 0.3 seconds" in str(caught.value) and _one_sentence(str(caught.value))
    assert list(tmp_path.iterdir()) == []


def test_tampered_file_is_discarded(server, cache):
    data = os.urandom(150_000)
    url = server.serve("/tampered.bin", data, tamper=True)
    with pytest.raises(ModelError) as caught:
        downloads.download_file(url, "tampered.bin", _sha256(data), size=len(data))
    message = str(caught.value)
    assert "does not match its registered sha256" in message and "the download was discarded" in message
    assert _sha256(data)[:12] in message and _one_sentence(message), message
    assert _cache_contents(cache) == []


def test_wrong_announced_size_is_refused_before_downloading(server, tmp_path):
    data = os.urandom(1000)
    url = server.serve("/sized.bin", data)
    with pytest.raises(ModelError) as caught:
        downloads.download_file(url, tmp_path / "sized.bin", _sha256(data), size=999)
    assert "announces 1000 bytes" in str(caught.value) and _one_sentence(str(caught.value))
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_a_404_error(server, cache):
    with pytest.raises(ModelError) as caught:
        downloads.download_file(server.url + "/nothing.zip", "nothing.zip", "0" * 64)
    message = str(caught.value)
    assert "was not found on the server (HTTP 404)" in message and "/nothing.zip" in message
    assert _one_sentence(message), message
    assert _cache_contents(cache) == []


def test_only_http_urls_are_downloaded(tmp_path):
    with pytest.raises(ModelError, match="Only http and https"):
        downloads.download_file("file:///etc/passwd", tmp_path / "x", "0" * 64)


# ---------------------------------------------------------------------------------------------------- zip safety


def _evil_zip(path: Path, name: str, symlink_to: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr("pkg/configs/metadata.json", "{}")
        info = zipfile.ZipInfo(name)
        if symlink_to is not None:
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zipped.writestr(info, symlink_to)
        else:
            zipped.writestr(info, "evil")
    return path


@pytest.fixture(params=["parent", "absolute", "symlink"])
def evil_zip(request, tmp_path):
    outside = tmp_path / "outside-evil"
    name, link, reason = {
        "parent": ("pkg/../../../outside-evil", None, "'..' path component"),
        "absolute": (outside.as_posix(), None, "absolute path"),
        "symlink": ("pkg/models/model.pt", "/etc/passwd", "symbolic link"),
    }[request.param]
    (tmp_path / "zips").mkdir()
    return _evil_zip(tmp_path / "zips" / "evil.zip", name, link), reason, outside


def test_unsafe_zip_entries_are_refused_and_nothing_is_written(evil_zip, tmp_path, cache):
    archive, reason, outside = evil_zip
    target = tmp_path / "work" / "deep" / "out"
    with pytest.raises(ModelError) as caught:
        downloads.extract_zip_safely(archive, target)
    message = str(caught.value)
    assert "unsafe entry" in message and reason in message and "nothing was extracted" in message
    assert _one_sentence(message), message
    assert not target.exists() and not outside.exists()
    assert not any("evil" in path.name and path.suffix != ".zip" for path in tmp_path.rglob("*"))

    with pytest.raises(ModelError, match="unsafe entry"):
        model_store.import_model(archive, trust_code=True)
    assert _cache_contents(cache) == [] and not outside.exists()


def test_unsafe_zip_from_a_url_model_is_refused(tmp_path, server, with_registry, cache):
    archive = _evil_zip(tmp_path / "evil.zip", "../evil")
    package = make_package(tmp_path / "build")
    url = server.serve("/evil.zip", archive.read_bytes())
    with_registry(url_entry(package, url, archive))
    with pytest.raises(ModelError, match="unsafe entry"):
        model_store.download_model(TINY_ID)
    assert _cache_contents(cache) == [] and not (cache.parent / "evil").exists()
    assert [path.name for path in cache.iterdir()] == [model_store.DOWNLOADS_SUBDIR]


def test_zip_bomb_is_refused_before_extraction(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("pkg/zeros.bin", bytes(3 << 20))
    assert archive.stat().st_size < 20_000
    with pytest.raises(ModelError) as caught:
        downloads.extract_zip_safely(archive, tmp_path / "out", max_bytes=1 << 20)
    assert "more than the 1048576 allowed" in str(caught.value) and not (tmp_path / "out").exists()


def test_not_a_zip_is_refused(tmp_path):
    (tmp_path / "fake.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ModelError, match="not a valid zip archive"):
        downloads.extract_zip_safely(tmp_path / "fake.zip", tmp_path / "out")


# --------------------------------------------------------------------------------------------- url model install


def test_url_model_must_be_downloaded_first_then_installs_verified(tiny, server, cache):
    _package, _archive, entry = tiny
    assert TINY_ID not in {model.id for model in registry.list_models()}
    with pytest.raises(ModelError) as caught:
        registry.get_model(TINY_ID)
    message = str(caught.value)
    assert "must be downloaded first" in message and f"models --download {TINY_ID}" in message
    assert _one_sentence(message), message
    assert [row["installed"] for row in model_store.downloadable_models()] == [False]

    calls: list[tuple[int, int | None]] = []
    model = model_store.download_model(TINY_ID, progress=lambda *a: calls.append(a))
    target = cache / f"{TINY_ID}-{TINY_VERSION}"
    assert model.id == TINY_ID and model.origin == "url" and model.package_dir == target
    assert calls[-1] == (entry["source"]["size"], entry["source"]["size"])
    assert [m.id for m in registry.list_models()] == [*SHIPPED_IDS, TINY_ID]
    assert registry.get_model(TINY_ID).title == "Tiny brain extraction (test package)"
    weights = registry.verified_weight_paths(model)
    assert set(weights) == {"bbox_model", "mask_model"}
    assert all(path.parent == target / "models" for path in weights.values())
    assert sorted(path.name for path in cache.iterdir()) == [model_store.DOWNLOADS_SUBDIR, target.name]
    assert not any((cache / model_store.DOWNLOADS_SUBDIR).iterdir())  # the zip is gone once unpacked
    assert (target / registry.INSTALL_MARKER).is_file() and model_store.downloadable_models()[0]["installed"]

    requests = len(server.requests)
    assert model_store.download_model(TINY_ID).package_dir == target
    assert len(server.requests) == requests  # already installed and verified


def test_modified_installed_weight_is_not_listed_and_a_new_download_repairs_it(tiny, cache):
    model = model_store.download_model(TINY_ID)
    weight = model.package_dir / "models" / "model.pt"
    data = bytearray(weight.read_bytes())
    data[10] ^= 0x01
    weight.write_bytes(bytes(data))
    assert TINY_ID not in {m.id for m in registry.list_models()}
    with pytest.raises(ModelError) as caught:
        registry.get_model(TINY_ID)
    message = str(caught.value)
    assert "cannot be used" in message and "sha256" in message and "download it again" in message
    assert _one_sentence(message), message
    repaired = model_store.download_model(TINY_ID)
    assert registry.verified_weight_paths(repaired)["mask_model"].read_bytes() != bytes(data)


def test_tampered_package_download_leaves_nothing(tiny, server, cache):
    server.routes["/tinybet.zip"].tamper = True
    with pytest.raises(ModelError, match="does not match its registered sha256"):
        model_store.install_model(TINY_ID)
    assert _cache_contents(cache) == []


def test_package_that_disagrees_with_its_registry_entry_is_refused(tmp_path, server, with_registry, cache):
    package = make_package(tmp_path / "build")
    archive = make_zip(package, tmp_path / "tinybet.zip")
    entry = url_entry(package, server.serve("/tinybet.zip", archive.read_bytes()), archive)
    entry["files"][0]["sha256"] = "1" * 64
    with_registry(entry)
    with pytest.raises(ModelError) as caught:
        model_store.download_model(TINY_ID)
    message = str(caught.value)
    assert "does not belong to the registered model 'tinybet'" in message and "bbox_model" in message
    assert _one_sentence(message), message
    assert _cache_contents(cache) == []


def test_install_model_accepts_an_entry_and_refuses_builtin_ones(tiny):
    _package, _archive, entry = tiny
    assert model_store.install_model(entry) == registry.installed_dir(TINY_ID, TINY_VERSION)
    with pytest.raises(ModelError, match="needs no download"):
        model_store.install_model("deepbet")
    broken = {**entry, "source": {**entry["source"], "sha256": "nothex"}}
    with pytest.raises(ModelError, match=r"at \$\.source\.sha256"):
        model_store.install_model(broken)


# -------------------------------------------------------------------------------------------------- import_model


def test_import_from_a_folder(tmp_path, cache):
    package = make_package(tmp_path / "site")
    model = model_store.import_model(package, trust_code=True)
    target = cache / f"{TINY_ID}-{TINY_VERSION}"
    assert model.id == TINY_ID and model.origin == "import" and model.package_dir == target
    assert [m.id for m in registry.list_models()] == [*SHIPPED_IDS, TINY_ID]
    assert registry.get_model(TINY_ID).package_dir == target
    weights = registry.verified_weight_paths(model)
    assert weights["mask_model"].read_bytes() == (package / "models" / "model.pt").read_bytes()
    assert model_store.import_model(package, trust_code=True).package_dir == target  # the same package again: harmless
    assert [path.name for path in cache.iterdir()] == [target.name]  # no staging folders left


def test_import_from_a_zip_with_or_without_a_top_folder(tmp_path, cache):
    package = make_package(tmp_path / "site", model_id=None)  # no slicer.id: the id comes from the name
    flat = make_zip(package, tmp_path / "flatbet.zip", top_folder=False)
    nested = make_zip(package, tmp_path / "whatever.zip", top_folder=True)
    assert model_store.import_model(flat, trust_code=True).id == "flatbet"
    assert model_store.import_model(nested, trust_code=True).id == "unnamed-package"
    assert {m.id for m in registry.list_models()} == {*SHIPPED_IDS, "flatbet", "unnamed-package"}


def test_import_and_extra_models_dirs_are_listed_together(tmp_path, monkeypatch):
    model_store.import_model(make_package(tmp_path / "site"), trust_code=True)
    extra = tmp_path / "extra"
    make_package(extra, model_id="extrabet")
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(extra))
    assert [m.id for m in registry.list_models()] == [*SHIPPED_IDS, TINY_ID, "extrabet"]


@pytest.mark.parametrize(
    ("change", "json_path", "phrase"),
    [
        (lambda m: m["slicer"]["files"][0].update(sha256="xyz"), "$.slicer.files[0].sha256",
         "'xyz' is not a sha256 checksum (64 hexadecimal digits)"),
        (lambda m: m["slicer"].update(task="segmentaton"), "$.slicer.task", "is not one of"),
        (lambda m: m["slicer"]["files"][1].pop("role"), "$.slicer.files[1]", "'role' is a required property"),
        (lambda m: m["slicer"]["files"][1].update(path="../../etc/passwd"), "$.slicer.files[1].path",
         "'../../etc/passwd' is not a relative path inside the package"),
        (lambda m: m.pop("version"), "$", "'version' is a required property"),
    ],
    ids=["sha256", "task", "role", "path", "version"],
)
def test_import_refuses_metadata_that_breaks_the_schema(tmp_path, cache, change, json_path, phrase):
    package = make_package(tmp_path / "site")
    edit_metadata(package, change)
    with pytest.raises(ModelError) as caught:
        model_store.import_model(package, trust_code=True)
    message = str(caught.value)
    assert f"at {json_path}:" in message and phrase in message and "metadata.json" in message
    assert "(?!" not in message and "^[" not in message  # words, never the schema's regular expression
    assert _one_sentence(message), message
    assert _cache_contents(cache) == [] and [path.name for path in cache.iterdir()] == []


@pytest.mark.parametrize("missing", ["docs/README.md", "LICENSE", "models/model.pt"])
def test_import_refuses_an_incomplete_package(tmp_path, cache, missing):
    package = make_package(tmp_path / "site")
    (package / missing).unlink()
    with pytest.raises(ModelError) as caught:
        model_store.import_model(package, trust_code=True)
    assert missing in str(caught.value) and _one_sentence(str(caught.value))
    assert _cache_contents(cache) == []


def test_import_refuses_a_modified_weight(tmp_path, cache):
    package = make_package(tmp_path / "site")
    weight = package / "models" / "bbox_model.pt"
    data = bytearray(weight.read_bytes())
    data[-1] ^= 0x01
    weight.write_bytes(bytes(data))
    with pytest.raises(ModelError) as caught:
        model_store.import_model(make_zip(package, tmp_path / "tinybet.zip"), trust_code=True)
    message = str(caught.value)
    assert "bbox_model.pt" in message and "does not match its registered sha256" in message and "refused" in message
    assert _one_sentence(message), message
    assert _cache_contents(cache) == []


def test_import_refuses_to_overwrite_a_different_package(tmp_path, cache):
    first = model_store.import_model(make_package(tmp_path / "one", seed=1), trust_code=True)
    with pytest.raises(ModelError) as caught:
        model_store.import_model(make_package(tmp_path / "two", seed=2), trust_code=True)
    message = str(caught.value)
    assert "different package of model 'tinybet' (version 0.1.0) is already installed" in message
    assert "models --import" in message and "--replace" in message and "models --remove tinybet" in message
    assert _one_sentence(message), message
    with pytest.raises(ModelError, match=r"\(version 0.1.0\) is already installed; replace it"):
        model_store.import_model(make_package(tmp_path / "three", version="0.2.0"), trust_code=True)
    assert registry.verified_weight_paths(registry.get_model(TINY_ID)) == registry.verified_weight_paths(first)
    assert model_store.remove_model(TINY_ID) == [first.package_dir]
    assert TINY_ID not in {m.id for m in registry.list_models()}
    assert model_store.import_model(tmp_path / "three" / TINY_ID, trust_code=True).version == "0.2.0"


def test_import_refuses_the_id_of_a_builtin_model(tmp_path, cache):
    with pytest.raises(ModelError, match="built into the extension"):
        model_store.import_model(make_package(tmp_path / "site", model_id="deepbet"))
    assert _cache_contents(cache) == []


def test_import_of_a_url_models_zip_installs_it_offline(tiny, server, cache):
    _package, archive, _entry = tiny
    model = model_store.import_model(archive)
    assert model.origin == "url" and registry.get_model(TINY_ID).package_dir == model.package_dir
    assert server.requests == []  # air-gapped: nothing was downloaded


# ------------------------------------------------------------------------------------------------- torch-free side


def test_registry_and_model_store_stay_free_of_torch_numpy_and_simpleitk():
    """What the Slicer GUI imports to list, download and import models must not load the engine's heavy libraries."""
    code = (
        "import sys\n"
        "from MIADeepLearningLib.engine import downloads, model_store, registry\n"
        "assert 'jsonschema' not in sys.modules, 'jsonschema must be imported lazily'\n"
        "registry.list_models(); model_store.downloadable_models()\n"
        "print(sorted(name for name in ('torch', 'numpy', 'SimpleITK', 'monai') if name in sys.modules))\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(paths.library_parent_dir())}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_without_jsonschema_shipped_models_still_list_but_imports_are_refused(tmp_path, monkeypatch, cache):
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # makes `import jsonschema` raise ImportError
    assert "deepbet" in {model.id for model in registry.list_models()}
    with pytest.raises(ModelError) as caught:
        model_store.import_model(make_package(tmp_path / "site"))
    message = str(caught.value)
    assert "needs the Python package jsonschema" in message and "pip install jsonschema" in message
    assert _one_sentence(message), message
    assert _cache_contents(cache) == []
