"""The metrics file: written line by line, read back strictly but tolerant of a live tail."""

import pytest

from distbelief.errors import UserError
from distbelief.metrics.log import MetricsLog, read_metrics


def test_round_trip_and_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write({"event": "train", "time": 0.5, "loss": 1.0})
        log.write({"event": "eval", "time": 1.0, "test_accuracy": 0.9})
    with open(path, "a") as f:
        f.write('{"event": "train", "ti')  # a live run is halfway through this line
    assert [e["event"] for e in read_metrics(path)] == ["train", "eval"]


def test_bad_line_in_the_middle_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "time": 0}\nnot json\n{"event": "eval", "time": 1}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_metrics(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_metrics(tmp_path / "metrics.jsonl")
