"""Smoke test of Testing/Benchmarks/zoo_compat.py on two tiny zoo-shaped bundles (zoo_shaped.py): a spleen-like
release zip that must import and segment with its output on the (oblique, flipped, anisotropic) input grid, and a
detection-like bundle that must be refused in one sentence. Why: the script is run by hand on the real zoo bundles
(minutes each), so a broken table, command line or check would otherwise show up only then. Also checks its pure
parts (what kind a bundle is, the label and agreement cells) on known inputs. monai.bundle run is not part of this
test (it needs a side environment with pytorch-ignite)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import zoo_shaped

BENCHMARK = Path(__file__).resolve().parents[1] / "Benchmarks" / "zoo_compat.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("zoo_compat_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_kinds_from_metadata_and_config(bench):
    cases = {"spleen": "3-D seg", "template": "3-D seg", "brats": "3-D seg, 4 ch", "slice2d": "2-D seg",
             "detection": "detection", "classification": "classification"}
    for kind, expected in cases.items():
        spec = zoo_shaped.KINDS[kind]()
        assert bench.describe(spec.metadata, spec.config)["kind"] == expected, kind
    assert bench.describe(zoo_shaped.brats_like().metadata, None)["channels"] == 4
    assert bench.image_key(zoo_shaped.spleen_like().config) == "image"
    assert bench.image_key(zoo_shaped.template_like().config) == "image"  # $monai.utils.CommonKeys.IMAGE


def test_cells(bench, tmp_path):
    assert bench.labels_cell([0.0, 1.0], {1}) == "ok {0,1}"
    assert bench.labels_cell([0.0, 1.0, 4.0], {1, 2}).startswith("not in segments: {4}")
    image = sitk.GetImageFromArray(np.array([[[0, 1], [1, 2]]], dtype=np.uint8))
    other = sitk.GetImageFromArray(np.array([[[0, 1], [1, 1]]], dtype=np.uint8))
    assert bench.agreement(image, other) == "75.000 %"
    blurred = sitk.GetImageFromArray(np.array([[[0, 0.5], [1, 1]]], dtype=np.float32))
    assert bench.agreement(image, blurred).startswith("not comparable")
    moved = sitk.Image(other)
    moved.SetOrigin((0.0, 0.0, 5.0))
    assert bench.grid_difference(moved, image) == "no (origin)"
    assert bench.last_line("Traceback (most recent call last):\n  x\nValueError: bad\n  during\n") == \
        "traceback: ValueError: bad"


def test_two_tiny_bundles_through_the_cli(bench, tmp_path):
    bundles = tmp_path / "bundles"
    zoo_shaped.write_bundle(bundles, "spleen", zip_release=True)
    zoo_shaped.write_bundle(bundles, "detection")
    assert (bundles / "tiny_spleen_ct_segmentation").is_dir()  # beside its zip: the zip is checked, not both
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCHMARK), str(bundles), "--work", str(tmp_path / "work"),
                           "--size", "24,24,16", "--timeout", "300", "--json", str(rows_file)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "| bundle | kind | imported (s) | ran (s) | on grid | labels |" in done.stdout
    rows = {row["bundle"]: row for row in json.loads(rows_file.read_text())}
    assert set(rows) == {"tiny_spleen_ct_segmentation", "tiny_lung_nodule_ct_detection"}

    spleen = rows["tiny_spleen_ct_segmentation"]
    assert spleen["kind"] == "3-D seg"
    assert not spleen["imported (s)"].startswith("no"), spleen
    assert not spleen["ran (s)"].startswith("no"), spleen
    assert spleen["on grid"] == "yes"
    assert spleen["labels"].startswith("ok {0"), spleen
    assert spleen["message"] == ""

    detection = rows["tiny_lung_nodule_ct_detection"]
    assert detection["kind"] == "detection"
    refused = detection["imported (s)"].startswith("no") or detection["ran (s)"].startswith("no")
    assert refused, detection
    message = detection["message"]
    assert "detection" in message and "traceback" not in message.lower()
    assert "\n" not in message and message.rstrip().endswith(".")
