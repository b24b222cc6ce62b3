"""Runs that tests read, launched early: from the session's start, one after another in a thread beside
the tests, in the order the selected tests first need them. A 2-rank launch keeps ~1 of 2 cores busy (its
start-up imports in one process at a time: the CLI, then DeepSpeed's launcher), so the tests' own launches
run beside these for little more than their own time. Only the runs the selected tests use are launched;
each has its own directory. The test modules that use them run after those that do not (`ordered`),
so the runs are mostly done when asked for. A test that a launch beside it would upset (one that compares
wall times) asks for `no_early_launches` first.

A module of its own: pytest loads tests/conftest.py as `conftest` and the test modules import it again as
`tests.conftest`; both copies must see one registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import pytest

_MAKERS: dict[str, tuple[Callable[..., object], tuple[str, ...]]] = {}
_LAUNCHED: dict[str, Future] = {}


def fixture(*needs: str):
    """A session fixture named after the function it decorates, `make(tmp_path_factory, *needs' results)`,
    launched early; a test waits for it where it uses it and gets its failure there. `needs`: early
    launches (registered before it) whose results it starts from."""

    def register(make: Callable[..., object]):
        assert all(n in _MAKERS for n in needs), f"{make.__name__}: register {needs} first"
        _MAKERS.setdefault(make.__name__, (make, needs))  # conftest's own: once per copy of it

        @pytest.fixture(scope="session", name=make.__name__)
        def wait(_early_launches: None):
            return _LAUNCHED[make.__name__].result()

        return wait

    return register


def ordered(items: list[pytest.Item]) -> None:
    """Sort `items` in place, whole modules kept together (their module fixtures set up once): first the
    modules that use no early launch, then those that do, last those with a test that asks for
    `no_early_launches`; otherwise as collected. The runs are then launched while the first group runs,
    and a test seldom waits for one (it waited ~60 s in all with test_cli and the contrastive tests early)."""

    def rank(item: pytest.Item) -> int:
        names = set(item.fixturenames)
        return 2 if "no_early_launches" in names else int(any(n in _MAKERS for n in names))

    group: dict[object, int] = {}
    for item in items:
        group[item.path] = max(group.get(item.path, 0), rank(item))
    items.sort(key=lambda item: group[item.path])


def _first_needed(items: Sequence[pytest.Item]) -> list[str]:
    """The early launches `items` use, in the order they are first needed (a run's needs just before it)."""
    names = list(_MAKERS)
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        for name in item.fixturenames:
            if name in _MAKERS:
                first.setdefault(name, i)
    for name in reversed(names):  # needed where its dependents are: they were registered after it
        for need in _MAKERS[name][1] if name in first else ():
            first[need] = min(first.get(need, first[name]), first[name])
    return sorted(first, key=lambda n: (first[n], names.index(n)))


def _launch(make: Callable[..., object], needs: tuple[str, ...], factory: pytest.TempPathFactory):
    return make(factory, *(_LAUNCHED[n].result() for n in needs))  # launched before it, on this thread


@contextmanager
def started(items: Sequence[pytest.Item], factory: pytest.TempPathFactory) -> Iterator[None]:
    """Launch what `items` use, one after another in one thread (a second made three launches at once on
    two cores: the suite took 535-539 s against 501 s), in the order they are first needed."""
    factory.getbasetemp()  # made here: made by two threads at once, it is two directories and a ValueError
    pool = ThreadPoolExecutor(1, thread_name_prefix="early-launch")
    try:
        for name in _first_needed(items):
            _LAUNCHED[name] = pool.submit(_launch, *_MAKERS[name], factory)
        yield
    finally:
        pool.shutdown(cancel_futures=True)  # a session cut short (-x, ^C) starts no more of them


def wait_all() -> None:
    """Until every early launch has ended: for a test whose timing another launch beside it would upset."""
    for future in _LAUNCHED.values():
        if not future.cancelled():
            future.exception()
