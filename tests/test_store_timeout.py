"""A key the job waits for and never gets (a role that never started, a value a stranger
deleted) ends the job in one line: the store's timeout is a JobFailed, which the command
prints as one line, and still a TimeoutError for the callers that wait and go on."""

from __future__ import annotations

import pytest

from distbelief.errors import JobFailed
from distbelief.runtime.store import StoreTimeout


def test_a_key_that_never_comes_is_a_job_failure_naming_it(store):
    with pytest.raises(StoreTimeout) as waited:
        store.get_json("members/shard/0", timeout=0.1, what="shard 0 to register")
    assert isinstance(waited.value, JobFailed) and isinstance(waited.value, TimeoutError)
    assert str(waited.value) == "timed out waiting for 'shard 0 to register'"
