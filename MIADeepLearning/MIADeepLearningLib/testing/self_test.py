"""The loop every module's Slicer self-test runs over its scenarios (one place, so the three modules report alike)."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from MIADeepLearningLib.testing.scenarios import ScenarioSkipped


def run_scenarios(test_case: Any, scenarios: Sequence[tuple[str, Callable[[], None]]], title: str) -> None:
    """Run each scenario on a fresh scene (`test_case.setUp()`), announcing it with `test_case.delayDisplay`; a
    ScenarioSkipped is logged and counted, any other exception is collected with its traceback, and the test fails
    once at the end naming every failed scenario — so one failure does not hide the others."""
    test_case.assertTrue(scenarios, "no scenarios registered")
    passed, skipped, failed = [], [], []
    for name, function in scenarios:
        test_case.setUp()
        test_case.delayDisplay(f"Scenario: {name}")
        try:
            function()
        except ScenarioSkipped as skip:
            skipped.append(f"{name}: {skip}")
            logging.warning(f"{title} scenario skipped: {name}: {skip}")
            test_case.delayDisplay(f"Skipped {name}: {skip}")
        except Exception:
            details = traceback.format_exc()
            failed.append(f"{name}:\n{details}")
            logging.error(f"{title} scenario failed: {name}\n{details}")
            test_case.delayDisplay(f"FAILED {name}")
        else:
            passed.append(name)
    test_case.setUp()
    test_case.delayDisplay(f"Scenarios: {len(passed)} passed, {len(skipped)} skipped, {len(failed)} failed")
    if failed:
        test_case.fail(f"{title} scenarios failed:\n" + "\n".join(failed))
