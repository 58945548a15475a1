"""The loop's Waker: a wake from another thread is seen by a poll of its pipe, and clearing it makes
the pipe quiet again (the loop then sleeps until its next timer)."""

from __future__ import annotations

import select
import threading

from falcoria_worker.connection import Waker


def _readable(waker: Waker) -> bool:
    return bool(select.select([waker], [], [], 0)[0])


def test_a_wake_from_another_thread_is_seen_until_cleared() -> None:
    waker = Waker()
    assert not _readable(waker)
    thread = threading.Thread(target=waker.wake)
    thread.start()
    thread.join()
    assert _readable(waker)
    waker.clear()
    assert not _readable(waker)


def test_many_wakes_never_block_and_one_clear_empties_them() -> None:
    waker = Waker()
    for _ in range(70_000):  # more than a pipe holds (64 KiB): the writer must not block
        waker.wake()
    waker.wait(10.0)  # returns at once: woken
    assert not _readable(waker)


def test_a_transition_wakes_the_loop() -> None:
    waker = Waker()
    waker.observe(object())
    assert _readable(waker)
