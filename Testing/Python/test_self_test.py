"""testing/self_test.run_scenarios: the loop the three modules' Slicer self-tests share."""

from __future__ import annotations

import unittest

import pytest

from MIADeepLearningLib.testing.scenarios import ScenarioSkipped
from MIADeepLearningLib.testing.self_test import run_scenarios


class RecordingCase(unittest.TestCase):
    """What ScriptedLoadableModuleTest offers the loop: setUp, delayDisplay, and unittest's assertions."""

    __test__ = False  # a stand-in, not a test of its own

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def runTest(self) -> None:  # unittest needs one to build an instance
        pass

    def setUp(self) -> None:
        self.events.append("setUp")

    def delayDisplay(self, message: str) -> None:
        self.events.append(message)


def _skip() -> None:
    raise ScenarioSkipped("no model here")


def _fail() -> None:
    raise AssertionError("wrong volume")


def test_every_scenario_runs_on_a_fresh_scene_and_failures_are_reported_together():
    ran: list[str] = []
    case = RecordingCase()
    scenarios = [("first", lambda: ran.append("first")), ("broken", _fail), ("skipped", _skip),
                 ("last", lambda: ran.append("last"))]
    with pytest.raises(AssertionError) as failure:
        run_scenarios(case, scenarios, "DLTest")
    assert ran == ["first", "last"]  # a failure does not stop the scenarios after it
    assert case.events.count("setUp") == len(scenarios) + 1
    assert "Skipped skipped: no model here" in case.events and "FAILED broken" in case.events
    assert case.events[-1] == "Scenarios: 2 passed, 1 skipped, 1 failed"
    message = str(failure.value)
    assert "DLTest scenarios failed" in message and "broken" in message and "wrong volume" in message
    assert "skipped" not in message.split("failed:", 1)[1].split("\n")[0]


def test_all_passing_scenarios_pass_and_no_scenarios_fail():
    case = RecordingCase()
    run_scenarios(case, [("only", lambda: None)], "DLTest")
    assert case.events[-1] == "Scenarios: 1 passed, 0 skipped, 0 failed"
    with pytest.raises(AssertionError, match="no scenarios registered"):
        run_scenarios(RecordingCase(), [], "DLTest")
