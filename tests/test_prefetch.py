"""training.prefetch: the next step's batch made in a background thread (the batches it makes: tests/test_training.py)."""

import threading


def test_prefetcher_makes_the_next_step_in_its_thread_and_falls_back_for_a_jump():
    from training.prefetch import Prefetcher

    made = []

    def make(step):
        made.append((step, threading.current_thread().name))
        return step * 10

    with Prefetcher(make) as get:
        assert [get(0), get(1), get(2)] == [0, 10, 20]
        assert get(7) == 70  # not the prefetched step 3: made in the caller's thread
    caller = threading.current_thread().name
    threads = dict(made)  # a step made twice would keep its last thread
    assert threads[0] == caller and threads[7] == caller
    assert threads[1].startswith("prefetch") and threads[2].startswith("prefetch")
    assert sorted(s for s, _ in made) == sorted(set(s for s, _ in made))  # no step made twice
    with Prefetcher(make, enabled=False) as get:
        before = len(made)
        assert get(4) == 40 and len(made) == before + 1 and made[-1][1] == caller
