"""The test suite (a package: its modules import the helpers of tests.support)."""

import pytest

# The helpers' asserts report like the tests' own (pytest rewrites only tests and conftests).
pytest.register_assert_rewrite("tests.support")
