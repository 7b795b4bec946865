"""Importing MONAI Model Zoo bundles as downloaded (issue 18): what is derived, what is refused, trust, remove,
replace and segment corrections.

The bundles are zoo-shaped (zoo_shaped.py: configs written by the project in the zoo's formats, random weights);
every import goes through the real model_store.import_model, including engine.bundles.check_bundle (the network is
built and its weights loaded), into a private cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zoo_shaped

from MIADeepLearningLib import cli, paths
from MIADeepLearningLib.engine import model_store, registry, zoo
from MIADeepLearningLib.engine.errors import ModelError


def _one_sentence(message: str) -> bool:
    """One line, ends with a full stop, and no second sentence inside it."""
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A private model cache; no extra model folders."""
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(registry.EXTRA_MODELS_ENV, raising=False)
    return tmp_path / "cache" / "models"


def _cache_entries(cache: Path) -> list[str]:
    """Everything left in the model cache (staging folders included), as relative paths."""
    return sorted(path.relative_to(cache).as_posix() for path in cache.rglob("*")) if cache.exists() else []


def _spec(kind: str = "spleen", config_format: str = "json") -> zoo_shaped.BundleSpec:
    spec = zoo_shaped.KINDS[kind]()
    spec.config_format = config_format
    return spec


def _cli(*arguments: str, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(paths.library_parent_dir())}
    return subprocess.run([sys.executable, "-m", "MIADeepLearningLib", *arguments], capture_output=True, text=True,
                          env=environment, stdin=stdin, timeout=600)


# ------------------------------------------------------------------------------------------- import as downloaded


@pytest.mark.parametrize(("config_format", "hash_type", "zipped"),
                         [("json", "md5", False), ("yaml", "sha256", True)], ids=["json-md5-folder", "yaml-sha256-zip"])
def test_zoo_bundle_imports_as_downloaded(tmp_path, cache, config_format, hash_type, zipped):
    source = zoo_shaped.write_bundle(tmp_path / "downloads", _spec("spleen", config_format), hash_type=hash_type,
                                     absent_ts=True, zip_release=zipped)
    bundle = tmp_path / "downloads" / "tiny_spleen_ct_segmentation"
    original = {path.relative_to(bundle).as_posix(): path.read_bytes() for path in bundle.rglob("*") if path.is_file()}

    model = model_store.import_model(source, trust_code=True)

    assert model.id == "tiny_spleen_ct_segmentation" and model.origin == "import" and model.origin_kind == "imported"
    assert model.task == "segmentation" and model.pipeline == registry.MONAI_BUNDLE_PIPELINE and model.derived_slicer
    assert model.package_dir == cache / "tiny_spleen_ct_segmentation-0.1.0"
    weight = bundle / "models" / "model.pt"
    # the listed model.ts is absent from this release: skipped; model.pt carries the sha256 computed at import
    assert [(w.role, w.path, w.sha256, w.size) for w in model.weights] == [
        ("model", "models/model.pt", hashlib.sha256(weight.read_bytes()).hexdigest(), weight.stat().st_size)]
    assert [(s["value"], s["name"]) for s in model.segments] == [(1, "spleen")]
    assert registry.verified_weight_paths(model) == {"model": model.package_dir / "models" / "model.pt"}
    # the bundle's own files are untouched; what was derived sits beside them, pinned by the install marker
    installed = {path.relative_to(model.package_dir).as_posix(): path.read_bytes()
                 for path in model.package_dir.rglob("*") if path.is_file()}
    assert {name: data for name, data in installed.items() if not name.startswith(".miadl-")} == original
    marker = registry.read_install_marker(model.package_dir)
    assert marker["trust"]["confirmed"] is True and marker["trust"]["at"]
    assert marker["slicer_sidecar_sha256"] == hashlib.sha256(
        (model.package_dir / registry.SLICER_SIDECAR).read_bytes()).hexdigest()
    assert "slicer" not in json.loads((model.package_dir / "configs" / "metadata.json").read_text())
    assert (zoo.PYYAML_REQUIREMENT in model.pip_requirements) == (config_format == "yaml")
    assert registry.get_model(model.id).summary()["origin_kind"] == "imported"
    assert [path.name for path in cache.iterdir()] == [model.package_dir.name]  # no staging folder left


def test_hashes_absent_from_large_files_are_computed_and_unlisted_weights_are_added(tmp_path, cache):
    bundle = zoo_shaped.write_bundle(tmp_path / "downloads", "spleen", hash_type=None)
    shutil.copyfile(bundle / "models" / "model.pt", bundle / "models" / "model_lowres.pt")  # not in large_files
    model = model_store.import_model(bundle, trust_code=True)
    sha = {w.role: w.sha256 for w in model.weights}
    assert set(sha) == {"model", "model_lowres"}
    expected = hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    assert sha["model"] == sha["model_lowres"] == expected
    section = json.loads((model.package_dir / registry.SLICER_SIDECAR).read_text())
    assert all("checked" not in item for item in section["files"])  # nothing to check against: computed only


def test_role_names_follow_the_file_stems(tmp_path):
    for name in ("model.pt", "model.ts", "model_lowres.pt", "search_code_18590.pt", "other.ts"):
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / name).write_bytes(name.encode())
    (tmp_path / "large_files.yml").write_text(
        zoo_shaped.large_files_yaml([{"path": "models/model.pt", "url": "https://example.invalid/m.pt",
                                      "hash_val": hashlib.sha1(b"model.pt").hexdigest(), "hash_type": "sha1"}]))
    files = zoo.weight_files(tmp_path, "The bundle")
    assert {item["path"]: item["role"] for item in files} == {
        "models/model.pt": "model", "models/model.ts": "model_ts", "models/model_lowres.pt": "model_lowres",
        "models/search_code_18590.pt": "search_code_18590", "models/other.ts": "other"}
    assert files[0]["checked"] == "sha1 from the bundle's large_files list"


def test_large_files_without_pyyaml_are_still_read(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    (tmp_path / "large_files.yml").write_text(zoo_shaped.large_files_yaml(
        [{"path": "models/model.pt", "url": "https://example.invalid/a", "hash_val": "ab" * 16, "hash_type": "md5"},
         {"path": "models/model.ts", "url": "https://example.invalid/b"}]))
    assert zoo.read_large_files(tmp_path) == [
        {"path": "models/model.pt", "url": "https://example.invalid/a", "hash_val": "ab" * 16, "hash_type": "md5"},
        {"path": "models/model.ts", "url": "https://example.invalid/b"}]


def test_a_weight_that_does_not_match_large_files_is_refused(tmp_path, cache):
    archive = zoo_shaped.write_bundle(tmp_path / "downloads", "spleen", hash_type="wrong", zip_release=True)
    with pytest.raises(ModelError) as caught:
        model_store.import_model(archive, trust_code=True)
    message = str(caught.value)
    assert "models/model.pt" in message and "does not match the md5 its large_files list gives" in message
    assert "refused" in message and _one_sentence(message), message
    assert _cache_entries(cache) == []


@pytest.mark.parametrize("kind", ["detection", "classification"])
def test_bundles_that_cannot_run_are_refused_before_anything_is_cached(tmp_path, cache, kind):
    archive = zoo_shaped.write_bundle(tmp_path / "downloads", kind, zip_release=True)
    with pytest.raises(ModelError) as caught:
        model_store.import_model(archive, trust_code=True)
    message = str(caught.value)
    assert f"it is a {kind} bundle" in message and _one_sentence(message), message
    assert not cache.exists()  # refused from the metadata and config read inside the zip: nothing was written


@pytest.mark.parametrize(("broken", "phrase"), [
    ("no_inference", "has no configs/inference.json or configs/inference.yaml"),
    ("unreadable_config", "configs/inference.json cannot be read"),
    ("not_state_dict", "model.pt of model 'Tiny spleen CT segmentation' is not a"),
])
def test_broken_bundles_are_refused_at_import(tmp_path, cache, broken, phrase):
    bundle = zoo_shaped.write_bundle(tmp_path / "downloads", "spleen", broken=broken)
    with pytest.raises(ModelError) as caught:
        model_store.import_model(bundle, trust_code=True)
    message = str(caught.value)
    assert phrase in message and "\n" not in message, message
    assert _cache_entries(cache) == []
    assert registry.list_models() and "tiny_spleen_ct_segmentation" not in {m.id for m in registry.list_models()}


def test_a_bundle_that_needs_a_missing_package_is_refused_naming_it(tmp_path, cache):
    from MIADeepLearningLib.engine import bundles

    bundle = zoo_shaped.write_bundle(tmp_path / "downloads", "optional_network")
    with pytest.raises(bundles.MissingPackages) as caught:
        model_store.import_model(bundle, trust_code=True)
    assert caught.value.requirements and "\n" not in str(caught.value)
    assert _cache_entries(cache) == []


def test_a_bundle_as_downloaded_in_an_extra_folder_says_to_import_it(tmp_path, monkeypatch):
    zoo_shaped.write_bundle(tmp_path / "extra", "spleen")
    monkeypatch.setenv(registry.EXTRA_MODELS_ENV, str(tmp_path / "extra"))
    with pytest.raises(ModelError, match=r"must be imported first .* models --import"):
        registry.list_models()


# ------------------------------------------------------------------------------------------------------------ trust


def test_import_needs_a_confirmation_that_the_code_may_run(tmp_path, cache):
    archive = zoo_shaped.write_bundle(tmp_path / "downloads", "scripts1", zip_release=True)
    description = model_store.describe_package(archive)
    assert description["title"] and description["version"] == "0.1.0"
    assert description["authors"] == "MIADeepLearning tests" and description["origin"] == str(archive)
    assert description["has_scripts"] and description["carries_code"] and description["zoo_bundle"]
    assert description["kind"] == zoo.SEGMENTATION_3D and not description["registry_pinned"]
    with pytest.raises(model_store.ConfirmationNeeded) as caught:
        model_store.import_model(archive)
    message = str(caught.value)
    assert str(archive) in message and description["title"] in message and "version 0.1.0" in message
    assert "MIADeepLearning tests" in message and "like installing software" in message
    assert _one_sentence(message) and caught.value.description == description
    assert not cache.exists()


def test_cli_import_without_a_terminal_needs_trust(tmp_path, cache):
    archive = zoo_shaped.write_bundle(tmp_path / "downloads", "spleen", zip_release=True)
    refused = _cli("models", "--import", str(archive))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: ") and "--trust" in refused.stderr and "like installing software" in \
        refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    assert not cache.exists()
    done = _cli("models", "--import", str(archive), "--trust", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == "tiny_spleen_ct_segmentation"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("answer", [True, False])
def test_cli_import_asks_on_a_terminal(tmp_path, cache, monkeypatch, capsys, answer):
    archive = zoo_shaped.write_bundle(tmp_path / "downloads", "spleen", zip_release=True)
    asked = []
    monkeypatch.setattr(cli, "_confirm", lambda question: asked.append(question) or answer)
    code = cli.main(["models", "--import", str(archive), "-q"])
    assert len(asked) == 1 and str(archive) in asked[0]
    if answer:
        assert code == 0 and registry.get_model("tiny_spleen_ct_segmentation").origin_kind == "imported"
    else:
        assert code == 2 and "its code was not confirmed" in capsys.readouterr().err
        assert not cache.exists()


def test_an_imported_model_without_a_confirmation_does_not_run(tmp_path, cache, capsys):
    model = model_store.import_model(zoo_shaped.write_bundle(tmp_path / "downloads", "spleen"), trust_code=True)
    marker_path = model.package_dir / registry.INSTALL_MARKER
    marker = json.loads(marker_path.read_text())
    del marker["trust"]  # as imported by an earlier version
    marker_path.write_text(json.dumps(marker))

    with pytest.raises(ModelError) as caught:
        registry.verified_weight_paths(registry.get_model(model.id))
    message = str(caught.value)
    assert "python -m MIADeepLearningLib models --trust tiny_spleen_ct_segmentation" in message
    assert "import it again" in message and _one_sentence(message), message
    image = tmp_path / "ct.nrrd"
    zoo_shaped.write_phantom(image)
    code = cli.main(["segment", "--model", model.id, "-i", str(image), "-o", str(tmp_path / "out.nrrd"), "-q"])
    assert code == 2 and "models --trust" in capsys.readouterr().err
    assert not (tmp_path / "out.nrrd").exists()
    cli.main(["models"])
    assert f"(code not confirmed: python -m MIADeepLearningLib models --trust {model.id})" in capsys.readouterr().out

    assert cli.main(["models", "--trust", model.id, "-q"]) == 0
    assert registry.verified_weight_paths(registry.get_model(model.id))
    assert json.loads(marker_path.read_text())["trust"]["confirmed"] is True
    provenance_path = tmp_path / "provenance.json"
    code = cli.main(["segment", "--model", model.id, "-i", str(image), "-o", str(tmp_path / "out.nrrd"),
                     "--provenance", str(provenance_path), "--no-type-check", "-q"])
    assert code == 0 and (tmp_path / "out.nrrd").is_file()
    assert json.loads(provenance_path.read_text())["model_origin"] == "imported", "provenance names the kind"


def test_built_in_models_need_no_confirmation_and_cannot_be_changed(capsys):
    deepbet = registry.get_model("brain-tissue")
    assert deepbet.origin_kind == "built-in" and registry.trust_problem(deepbet) is None
    for arguments, phrase in ((["--remove", "brain-tissue"], "cannot be removed"),
                              (["--trust", "brain-tissue"], "cannot be confirmed"),
                              (["--segments", "brain-tissue", "x.json"], "cannot be changed")):
        assert cli.main(["models", *arguments]) == 2
        err = capsys.readouterr().err
        assert "built into the extension" in err and phrase in err and len(err.splitlines()) == 1


# -------------------------------------------------------------------------------------------- remove and replace


def test_remove_and_replace(tmp_path, cache, capsys):
    first = model_store.import_model(zoo_shaped.write_bundle(tmp_path / "one", "spleen", seed=1), trust_code=True)
    second_source = zoo_shaped.write_bundle(tmp_path / "two", "spleen", seed=2)
    with pytest.raises(ModelError) as caught:
        model_store.import_model(second_source, trust_code=True)
    message = str(caught.value)
    assert f"models --import {second_source} --replace" in message and "models --remove tiny_spleen" in message
    assert _one_sentence(message), message

    # a replacement that fails its checks leaves the installed copy as it was
    broken = zoo_shaped.write_bundle(tmp_path / "three", "spleen", broken="not_state_dict")
    with pytest.raises(ModelError):
        model_store.import_model(broken, trust_code=True, replace=True)
    assert registry.verified_weight_paths(registry.get_model(first.id)) == registry.verified_weight_paths(first)
    assert [path.name for path in cache.iterdir()] == [first.package_dir.name]

    second = model_store.import_model(second_source, trust_code=True, replace=True)
    assert second.weights[0].sha256 != first.weights[0].sha256
    assert registry.get_model(first.id).weights[0].sha256 == second.weights[0].sha256

    # a newer version replaces every older one
    newer = zoo_shaped.write_bundle(tmp_path / "four", zoo_shaped.spleen_like(version="0.2.0"))
    third = model_store.import_model(newer, trust_code=True, replace=True)
    assert third.version == "0.2.0" and [path.name for path in cache.iterdir()] == [third.package_dir.name]

    assert cli.main(["models", "--remove", first.id]) == 0
    assert "removed " in capsys.readouterr().err
    assert first.id not in {m.id for m in registry.list_models()} and list(cache.iterdir()) == []
    assert cli.main(["models", "--remove", first.id]) == 2
    assert "no downloaded or imported copy" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ segment names


def test_segment_corrections_override_the_bundles_names(tmp_path, cache, capsys):
    from MIADeepLearningLib.engine import bundles

    model = model_store.import_model(zoo_shaped.write_bundle(tmp_path / "downloads", "template"), trust_code=True)
    derived = {s["value"]: s for s in model.segments}
    corrections = tmp_path / "names.json"
    corrections.write_text(json.dumps([
        {"value": 1, "name": "Left kidney", "color": [185, 102, 83]},
        {"value": 2, "name": "Right kidney", "terminology": "Segmentation category and type - 3D Slicer General "
                                                           "Anatomy list~SCT^123037004^Anatomical Structure~SCT^"
                                                           "9846003^Right kidney~^^~Anatomic codes - DICOM master "
                                                           "list~^^~^^"}]))
    assert cli.main(["models", "--segments", model.id, str(corrections), "-q"]) == 0
    corrected = registry.get_model(model.id)
    by_value = {s["value"]: s for s in corrected.segments}
    assert by_value[1]["name"] == "Left kidney" and by_value[1]["color"] == [185, 102, 83]
    assert by_value[2]["name"] == "Right kidney" and "9846003" in by_value[2]["terminology"]
    assert by_value[3] == derived[3]  # values not corrected keep the bundle's name
    # what a run uses (the bundle pipeline's segment list) sees the corrections too
    assert {s["value"]: s["name"] for s in bundles.segments_from_metadata(corrected.metadata)}[1] == "Left kidney"
    assert registry.trust_problem(corrected) is None and registry.verified_weight_paths(corrected)

    bad = tmp_path / "bad.json"
    for content, phrase in (([{"value": 0, "name": "Background"}], "segment 1"), ({"x": 1}, "not a list"),
                            ([{"value": 1, "name": "a"}, {"value": 1, "name": "b"}], "more than once")):
        bad.write_text(json.dumps(content))
        assert cli.main(["models", "--segments", model.id, str(bad)]) == 2
        err = capsys.readouterr().err
        assert phrase in err and len(err.splitlines()) == 1, err
    assert registry.get_model(model.id).segments == corrected.segments

    corrections.write_text("[]")
    assert cli.main(["models", "--segments", model.id, str(corrections), "-q"]) == 0
    assert registry.get_model(model.id).segments == model.segments


# ------------------------------------------------------------------------------------------- tamper and messages


@pytest.mark.parametrize("changed", [registry.SLICER_SIDECAR, "configs/inference.json"])
def test_an_installed_bundle_changed_afterwards_is_not_listed(tmp_path, cache, changed):
    model = model_store.import_model(zoo_shaped.write_bundle(tmp_path / "downloads", "spleen"), trust_code=True)
    path = model.package_dir / changed
    path.write_text(path.read_text().replace("spleen", "spleeen", 1).replace('"model"', '"model" ', 1))
    assert model.id not in {m.id for m in registry.list_models()}


def test_models_command_never_shows_a_traceback(monkeypatch, capsys):
    def broken(task=None):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(registry, "list_models", broken)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert err == "error: Unexpected error (RuntimeError: something went wrong).\n"
