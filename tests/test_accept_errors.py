"""Tests of dsm_stt.server.accept_errors: failed accepts for lack of descriptors become one
warning line per interval with a count; other loop errors reach the previous handler."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from dsm_stt.server.accept_errors import AcceptErrorLog


def test_one_warning_per_interval_with_the_count_and_others_pass_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    counted: list[int] = []
    guard = AcceptErrorLog(
        interval=10.0, clock=lambda: now[0], on_failure=lambda: counted.append(1)
    )
    seen: list[dict] = []
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda _loop, context: seen.append(context))
        guard.install(loop)
        emfile = OSError(errno.EMFILE, "Too many open files")
        with caplog.at_level(logging.WARNING, logger="dsm_stt.server"):
            for t in range(25):  # one failed accept a second for 25 s
                now[0] = float(t)
                loop.call_exception_handler({"message": "accept", "exception": emfile})
        other = {"message": "something else", "exception": ValueError("x")}
        loop.call_exception_handler(other)
        guard.uninstall()
        assert loop.get_exception_handler() is not guard
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(lines) == 3  # at 0, 10 and 20 s
    assert "(1 refused" in lines[0] and "(10 refused" in lines[1] and "(10 refused" in lines[2]
    assert guard.failed == 25 and len(counted) == 25
    assert seen == [other]
