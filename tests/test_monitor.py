"""The run's logs (user_dist.monitor) on a real full disk: training is not
stopped by a log line, and a line cut short does not swallow the next run's."""
import json
import logging
import os
import threading

import pytest

from user_dist.monitor import Monitor


def read_records(path):
    good, bad = [], 0
    with open(path) as f:
        for line in f:
            try:
                good.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return good, bad


# TensorBoard's own writer thread dies of the full disk (what the test provokes);
# the Monitor then reports it once and logs on without TensorBoard.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_stops_the_json_log_once_and_a_resumed_log_starts_on_a_new_line(small_disk, caplog):
    disk = small_disk(1)
    run_dir = os.path.join(disk.path, "run")
    os.makedirs(run_dir)
    before = set(threading.enumerate())
    mon = Monitor(run_dir, True, total_steps=100)
    mon.scalars({"train/loss": 1.0}, 1)
    ballast = disk.fill(leave_bytes=100)  # room for part of one line
    with caplog.at_level(logging.ERROR, logger="user_dist"):
        for step in range(2, 40):  # a long line each, so that the disk is full within the first
            mon.scalars({"train/loss": 1.0, **{f"x/{i}": float(i) for i in range(20)}}, step)
        mon.flush()
        mon.close()
    # Let TensorBoard's dead writer thread finish unwinding here: under load its
    # exception report could otherwise land in whichever test runs next.
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=10)
    for what in ("train_log.jsonl stops here", "TensorBoard logging stops here"):
        errors = [r.getMessage() for r in caplog.records if what in r.getMessage()]
        assert len(errors) == 1 and "No space left on device" in errors[0], (what, errors)
    os.remove(ballast)
    log = os.path.join(run_dir, "train_log.jsonl")
    with open(log, "rb") as f:
        cut = not f.read().endswith(b"\n")
    mon = Monitor(run_dir, True, total_steps=100)  # the resumed run appends
    mon.scalars({"train/loss": 0.5}, 40)
    mon.close()
    records, bad = read_records(log)
    assert records[0]["step"] == 1 and records[-1] == {**records[-1], "step": 40, "train/loss": 0.5}
    assert bad == int(cut) and bad <= 1  # only the line the disk cut short
