"""Running the tasks of a pass: on a dask cluster, or in this process.

- Bounded submission: at most MAX_IN_FLIGHT tasks are with the scheduler at a time,
  topped up as they finish, so its graph stays small however many blocks there are (a
  terabyte is ~500k blocks); results come back in batches and are handed to the caller
  as they arrive, so the client keeps what it aggregates, not a record per task.
- Retries: an exception inside a task goes to dask, which runs the task again up to
  ``retries`` times (a transient read error, a worker that died); in this process the
  same loop runs here. A task that still fails stops the pass with ``TaskFailed``,
  carrying the item, the error and its traceback; the tasks still queued are cancelled.
- Pools: with workers that declare a GPU resource, ``map_split`` runs the prediction
  there and the rest of the block on CPU workers, so the two overlap.
"""
from __future__ import annotations

import sys
import traceback
from typing import Any, Callable, Iterable, Iterator

MAX_IN_FLIGHT = 2000  # tasks submitted to the scheduler at once
RETRIES = 2           # further attempts of a task that raised


class TaskFailed(Exception):
    """A task that raised on every attempt: ``item`` is what it was run on."""

    def __init__(self, item: Any, error: str, traceback_text: str, attempts: int):
        super().__init__(error)
        self.item, self.error, self.traceback_text, self.attempts = item, error, traceback_text, attempts


def on_gpu_worker() -> bool:
    """Whether the dask worker running this task declares a GPU resource (False outside
    a worker): the report counts where each block's two halves ran."""
    try:
        from distributed import get_worker
        return bool(get_worker().state.total_resources.get("GPU"))
    except ValueError:  # not in a worker: workers=0
        return False


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    # On a cluster stderr is a log file: a line every 30 s, not a bar.
    return tqdm(total=total, desc=desc, unit="task", disable=not enabled, file=sys.stderr,
                mininterval=0.5 if tty else 30, dynamic_ncols=tty, ascii=not tty)


class Executor:
    """Runs tasks on ``client`` (a distributed Client) or, without one, in this process."""

    def __init__(self, client=None, retries: int = RETRIES, progress: bool = False):
        self.client = client
        self.retries = retries
        self.progress = progress

    @property
    def workers(self) -> int:
        if self.client is None:
            return 0
        return len(self.client.scheduler_info(n_workers=-1)["workers"])

    def pools(self) -> dict:
        """Whether any worker declares a GPU resource, or a CPU one (a CPU pool)."""
        pools = {"GPU": False, "CPU": False}
        if self.client is not None:
            for w in self.client.scheduler_info(n_workers=-1)["workers"].values():
                for r in pools:
                    pools[r] = pools[r] or bool(w.get("resources", {}).get(r))
        return pools

    def map(self, fn: Callable, items: Iterable, *args, total: int, desc: str = "") -> Iterator[tuple[Any, Any]]:
        """(item, fn(item, *args)) for every item, in the order they finish."""
        bar = _progress(total, desc, self.progress)
        try:
            if self.client is None:
                for item in items:
                    yield item, self._run_here(fn, item, *args)
                    bar.update(1)
            else:
                for item, result in self._run_on_cluster(
                        lambda item: [self.client.submit(fn, item, *args, retries=self.retries, pure=False)],
                        items):
                    yield item, result
                    bar.update(1)
        finally:
            bar.close()

    def map_split(self, predict: Callable, finish: Callable, items: Iterable, *args,
                  total: int, desc: str = "") -> Iterator[tuple[Any, Any]]:
        """As ``map`` of finish(predict(item, *args), item, *args), with ``predict`` on a
        worker that declares a GPU and ``finish`` on a CPU-pool worker if there is one.
        While one block's watershed runs, the GPU predicts the next. The prediction stays
        in worker memory, never on disk."""
        cpu = {"CPU": 1} if self.pools()["CPU"] else None

        def submit(item):
            pred = self.client.submit(predict, item, *args, resources={"GPU": 1}, retries=self.retries, pure=False)
            return [self.client.submit(finish, pred, item, *args, resources=cpu, retries=self.retries, pure=False),
                    pred]
        # Predictions waiting for a CPU worker sit in worker memory (tens of MB per block):
        # keep about two blocks per worker in flight, enough for the pools to overlap.
        bar = _progress(total, desc, self.progress)
        try:
            for item, result in self._run_on_cluster(submit, items, window=max(4, 2 * self.workers)):
                yield item, result
                bar.update(1)
        finally:
            bar.close()

    # ------------------------------------------------------------------ internals
    def _run_here(self, fn, item, *args):
        for attempt in range(self.retries + 1):
            try:
                return fn(item, *args)
            except Exception as exc:  # retried, then reported with its traceback
                error, tb = _error_text(exc), traceback.format_exc()
        raise TaskFailed(item, error, tb, self.retries + 1)

    def _run_on_cluster(self, submit, items, window: int | None = None):
        """Keep at most ``window`` (default MAX_IN_FLIGHT) items in flight; ``submit(item)``
        returns the item's futures, the first of which holds its result (the others are
        released with it)."""
        from distributed import as_completed
        window = window or MAX_IN_FLIGHT
        pending = iter(items)
        owner: dict[str, tuple[Any, list]] = {}

        def top_up(n):
            new = []
            if n <= 0:
                return new
            for item in pending:
                futures = submit(item)
                owner[futures[0].key] = (item, futures)
                new.append(futures[0])
                if len(new) >= n:
                    break
            return new
        running = as_completed(top_up(window))
        try:
            for batch in running.batches():
                failed = [f for f in batch if f.status == "error"]
                if failed:
                    f = failed[0]
                    exc, tb = f.exception(), f.traceback()
                    text = "".join(traceback.format_exception(type(exc), exc, tb)) if tb is not None \
                        else _error_text(exc)
                    raise TaskFailed(owner[f.key][0], _error_text(exc), text, self.retries + 1)
                for future, result in zip(batch, self.client.gather(batch)):
                    item, futures = owner.pop(future.key)
                    for f in futures:
                        f.release()
                    yield item, result
                if len(owner) <= window // 2:
                    running.update(top_up(window - len(owner)))
        finally:
            if owner:  # stopped early (a failure, an interruption): drop what is still queued
                self.client.cancel([f for _, futures in owner.values() for f in futures])
