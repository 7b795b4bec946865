"""Smoke test of Testing/Benchmarks/registration.py on tiny synthetic label maps (no ../shared data, a few seconds).

Why: the benchmark runs for an hour on real maps, so a broken pair builder, method wrapper or report would otherwise
show up only then. This checks that pairs of both kinds (the oblique one included) are built, that every classical
method and the shipped network (through engine.registration) return a field the evaluation accepts, that the grid
reorientation keeps every voxel's physical position, and that the table and the JSON come out. It says nothing about
accuracy or speed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MIADeepLearningLib.training.generator import compact_labels
from MIADeepLearningLib.training.label_maps import LabelMap, save_bundle

BENCHMARK = Path(__file__).resolve().parents[1] / "Benchmarks" / "registration.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("registration_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def phantom(name: str, shape: tuple[int, int, int], scale: float) -> LabelMap:
    """Nested ellipsoids with FreeSurfer values: scalp (extra-cerebral, 258), CSF 24, cortex 3, WM 2, ventricle 4,
    and a small off-centre 'thalamus' 10 so a rotation matters."""
    z, y, x = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    radius = np.sqrt((z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2) / scale
    labels = np.zeros(shape, dtype=np.int32)
    for value, outer in ((258, 1.0), (24, 0.85), (3, 0.75), (2, 0.55), (4, 0.2)):
        labels[radius < outer] = value
    labels[(np.abs(z - 0.25) < 0.15) & (np.abs(y + 0.2) < 0.15) & (np.abs(x - 0.2) < 0.2)] = 10
    indices, values = compact_labels(labels)
    return LabelMap(name, indices, values)


def test_reoriented_grid_keeps_physical_positions(monkeypatch):
    bench = load_benchmark()
    monkeypatch.setattr(bench, "OBLIQUE_ANGLES_DEG", (0.0, 0.0, 0.0))
    array = np.random.default_rng(0).integers(0, 50, (7, 9, 11)).astype(np.int32)
    origin, direction = bench.centred_grid(array.shape, 1.5)
    image = bench.image_of(array, 1.5, origin, direction)
    moved = bench.reoriented(image)
    assert moved.GetSize() != image.GetSize()
    back = sitk.Resample(moved, image, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)


def test_benchmark_runs_on_synthetic_maps(tmp_path, monkeypatch, capsys):
    bench = load_benchmark()
    monkeypatch.setattr(bench, "Settings", functools.partial(bench.Settings, demons_iterations=(4, 2),
                                                             bspline_iterations=2))
    save_bundle([phantom("map_a", (30, 32, 34), 1.0), phantom("map_b", (31, 32, 33), 0.95)], tmp_path / "maps.npz")
    output = tmp_path / "out.json"
    code = bench.main(["--label-maps", str(tmp_path / "maps.npz"), "--held-out", "map_a", "map_b",
                       "--pairs", "inter-a-b,intra-b-oblique", "--methods", "identity,affine,demons,bspline,network",
                       "--json", str(output)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| bspline |" in printed and "| network |" in printed
    payload = json.loads(output.read_text())
    assert payload["pairs"]["intra-b-oblique"]["oblique"] is True
    rows = {(row["pair"], row["method"]): row for row in payload["outcomes"]}
    assert set(rows) == {(pair, method) for pair in ("inter-a-b", "intra-b-oblique")
                         for method in ("identity", "affine", "demons", "bspline", "network")}
    for row in rows.values():
        assert 0.0 <= row["dice"] <= 1.0 and all(0.0 <= value <= 1.0 for value in row["tissue"].values())
        assert math.isfinite(row["non_positive_percent"]) and math.isfinite(row["cpu_s"])
    assert rows[("intra-b-oblique", "affine")]["non_positive_percent"] == 0.0
