"""Every test has a time limit (pytest-timeout), so one hung test cannot hold CI for its whole 90 minutes."""

from __future__ import annotations

import pytest

from tests.conftest import TIER_TIMEOUT_S, tier_timeout


def test_every_collected_test_carries_its_tiers_limit(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    assert items, "nothing collected"
    for item in items:
        marker = item.get_closest_marker("timeout")
        assert marker is not None, f"{item.nodeid} has no time limit"
        marks = {mark.name for mark in item.iter_markers()}
        declared = [*getattr(getattr(item, "obj", None), "pytestmark", []), *_module_marks(item)]
        if not any(mark.name == "timeout" for mark in declared):
            assert marker.args[0] == tier_timeout(marks), item.nodeid


def _module_marks(item: pytest.Item) -> list[pytest.Mark]:
    marks = getattr(getattr(item, "module", None), "pytestmark", [])
    return list(marks) if isinstance(marks, list) else [marks]


def test_the_largest_tier_limit_wins_and_an_unknown_tier_is_refused() -> None:
    assert tier_timeout({"unit"}) == TIER_TIMEOUT_S["unit"]
    assert tier_timeout({"serve", "aws"}) == TIER_TIMEOUT_S["serve"] > TIER_TIMEOUT_S["aws"]
    assert tier_timeout({"cluster", "parametrize"}) == TIER_TIMEOUT_S["cluster"]
    with pytest.raises(pytest.UsageError):
        tier_timeout({"parametrize"})


def test_a_hung_test_fails_at_its_limit_and_the_run_goes_on(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import threading
        import pytest

        @pytest.mark.timeout(1)
        def test_hangs():
            threading.Event().wait(120)

        def test_after():
            assert True
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*Timeout*"])
