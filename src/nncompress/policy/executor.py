"""Where candidate policies are evaluated: in this process, or as Ray tasks.

An executor runs one module-level function ``fn(shared, item)`` over lists of items: the
search hands over ``shared`` once (the model and the held-out subset) and then, per round,
the candidates (plain data). Both executors return results in the order the items were
given and run the same function (which fixes its torch thread count), so a seeded search gives
identical results on either.

Ray (https://docs.ray.io): ``ray.init()`` starts a local Ray on this machine's cores;
``address="auto"`` or ``"HOST:PORT"`` joins a cluster started with ``ray start --head`` (every
node needs nncompress and torch installed). The model and the subset are put in the object
store once (``ray.put``); each candidate is one task with ``num_cpus=1``; at most ``workers``
tasks are in flight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from ..core.errors import ConfigError

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "make_executor"]

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


class Executor:
    """Evaluates candidates. Use as a context manager (``close`` releases resources)."""

    name = "base"
    workers = 1

    def connect(self) -> None:
        """Check that the executor can run (call it before long work; idempotent)."""

    def start(self, fn: Callable[[Any, Any], dict], shared: Any) -> None:
        """Remember ``fn`` and send ``shared`` (what every call needs) to the workers once."""
        raise NotImplementedError

    def map(self, items: Sequence[Any]) -> list[dict]:
        """``[fn(shared, item) for item in items]``, possibly in parallel, in order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"executor": self.name, "workers": self.workers}

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """Evaluates the candidates one after the other in this process."""

    name = "local"

    def __init__(self) -> None:
        self._fn: Callable[[Any, Any], dict] | None = None
        self._shared: Any = None

    def start(self, fn: Callable[[Any, Any], dict], shared: Any) -> None:
        self._fn, self._shared = fn, shared

    def map(self, items: Sequence[Any]) -> list[dict]:
        if self._fn is None:
            raise RuntimeError("LocalExecutor.map before start")
        return [self._fn(self._shared, it) for it in items]


@contextlib.contextmanager
def _foreground_workers():
    """Ray starts its workers at nice 15 (background work); in a local Ray started for a
    search the workers are the work, and on a busy machine nice 15 starved them (a smoke search
    took 157 s instead of 23 s). The raylet reads RAY_worker_niceness when it starts; a value
    the user set is kept."""
    key = "RAY_worker_niceness"
    old = os.environ.get(key)
    if old is None:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)


def _check_address(address: str, timeout: float = 3.0) -> None:
    """A ``HOST:PORT`` Ray address must accept a TCP connection (fail fast, clearly)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(
            f"ray_address={address!r}: must be 'auto' or HOST:PORT (the GCS address printed "
            "by 'ray start --head', port 6379 by default)"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(
            f"ray_address={address!r}: no Ray head answers there ({exc}); start one with "
            "'ray start --head' or search with the local executor (--executor local)"
        ) from None


class RayExecutor(Executor):
    """Evaluates candidates as Ray tasks (see the module docstring).

    Parameters
    ----------
    address : ``None`` starts a local Ray (``num_cpus=workers``); ``"auto"`` or
        ``"HOST:PORT"`` joins a running cluster. A Ray already initialised in this process
        is reused and left running.
    workers : most tasks in flight at once (default: the cluster's CPUs).
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"workers={workers!r}: must be an integer >= 1")
        self.address = address
        self._want_workers = workers
        self.workers = workers or 1
        self._owned = False
        self._ray = None
        self._task = None
        self._shared_ref = None

    def connect(self) -> None:
        """Import Ray and start or join it: a missing Ray or an address that does not answer
        is a :class:`~nncompress.core.ConfigError` here, before any episode."""
        self._init()

    def _init(self):
        if self._ray is not None:
            return self._ray
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "executor='ray': Ray is not installed; install it with "
                "pip install 'nncompress[policy]', or use the local executor "
                "(executor='local', --executor local)"
            ) from None
        if self.address not in (None, "auto", "local"):
            _check_address(self.address)
        if not ray.is_initialized():
            kwargs = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.WARNING,
            }
            try:
                if self.address in (None, "local"):
                    with _foreground_workers():
                        ray.init(num_cpus=self._want_workers, **kwargs)
                else:
                    ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(
                    f"ray_address={self.address!r}: cannot join a Ray cluster ({exc}); start "
                    "one with 'ray start --head' or use the local executor (--executor local)"
                ) from None
            self._owned = True
        if self._want_workers is None:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._ray = ray
        return ray

    def start(self, fn: Callable[[Any, Any], dict], shared: Any) -> None:
        ray = self._init()
        self._task = ray.remote(num_cpus=1)(fn)
        self._shared_ref = ray.put(shared)  # once: every task reads it from the object store
        log.info("ray executor: %d workers, resources %s", self.workers, ray.cluster_resources())

    def map(self, items: Sequence[Any]) -> list[dict]:
        if self._task is None:
            raise RuntimeError("RayExecutor.map before start")
        ray = self._ray
        refs: list = []
        pending: list = []
        for item in items:
            if len(pending) >= self.workers:
                _, pending = ray.wait(pending, num_returns=1)
            ref = self._task.remote(self._shared_ref, item)
            refs.append(ref)
            pending.append(ref)
        return list(ray.get(refs))

    def close(self) -> None:
        if self._ray is not None and self._owned:
            self._ray.shutdown()
        self._ray = self._task = self._shared_ref = None
        self._owned = False

    def describe(self) -> dict:
        return {"executor": self.name, "workers": self.workers, "address": self.address}


def make_executor(name: str, address: str | None = None, workers: int | None = None) -> Executor:
    """``local`` or ``ray`` (with ``address`` / ``workers``)."""
    if name == "local":
        if address is not None:
            raise ConfigError("ray_address: only applies to executor='ray'")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, workers)
    raise ConfigError(f"executor={name!r}: must be one of {EXECUTORS}")
