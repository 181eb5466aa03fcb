"""EmbeddingBatcher: concurrent embedding inputs gathered into batches, one forward pass per batch.

The seam between the server and the model: ``submit(token_ids, params)`` from any event loop, ``close()``,
and the ``num_waiting`` / ``num_running`` / ``dead_error`` readings. A Triton-style dynamic batcher
(``flotilla.repository``) can take its place by offering the same members.

How it batches: one worker thread runs one batch at a time; while it runs, new inputs queue up. When it is
free it takes everything that is waiting, oldest first, up to ``max_num_seqs`` inputs and
``max_num_batched_tokens`` padded tokens (``next_batch_size``), without waiting for more (no queue delay:
under load batches grow by themselves, alone an input runs at once). The event loop never blocks: results
come back with ``call_soon_threadsafe``. An input whose caller was cancelled (client gone) before its batch
formed is dropped; one cancelled later is computed and discarded. A forward pass that raises fails the
inputs of that batch only; the batcher keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from flotilla.engine.embedding import next_batch_size
from flotilla.errors import EngineDeadError
from flotilla.pooling_params import PoolingParams

logger = logging.getLogger(__name__)

RunBatch = Callable[[list[list[int]], list[PoolingParams]], list]


@dataclass
class _Item:
    token_ids: list[int]
    params: PoolingParams
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cancelled: bool = field(default=False)


class EmbeddingBatcher:
    """Batches ``submit``ted inputs for ``run_batch(token_id_lists, params_list) -> results`` (see the module
    docstring). ``batches_run`` / ``inputs_run`` count what the worker has run (for metrics and tests)."""

    def __init__(self, run_batch: RunBatch, max_num_seqs: int, max_num_batched_tokens: int,
                 name: str = "flotilla-embed"):
        self.run_batch = run_batch
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dead_error: BaseException | None = None
        self.num_running = 0
        self.batches_run = self.inputs_run = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return len(self._pending)

    async def submit(self, token_ids: list[int], params: PoolingParams):
        """The result of ``run_batch`` for this input, once its batch ran; EngineDeadError once closed."""
        loop = asyncio.get_running_loop()
        item = _Item(token_ids, params, loop.create_future(), loop)
        with self._cond:
            if self._closed or self.dead_error is not None:
                raise EngineDeadError("the embedding model is not running")
            self._pending.append(item)
            self._cond.notify()
        try:
            return await item.future
        except asyncio.CancelledError:
            item.cancelled = True
            raise

    def close(self) -> None:
        """Stop the worker after the batch it runs; inputs still waiting fail with EngineDeadError."""
        with self._cond:
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        self._fail(waiting, EngineDeadError("the embedding model was shut down"))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def _take(self) -> list[_Item] | None:
        """The next batch (blocking until there is one), or None once closed."""
        with self._cond:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self._pending.popleft()
                if self._closed:
                    return None
                if self._pending:
                    break
                self._cond.wait()
            live = [i for i in self._pending if not i.cancelled]
            n = next_batch_size([len(i.token_ids) for i in live], self.max_num_seqs, self.max_num_batched_tokens)
            batch = live[:n]
            taken = {id(i) for i in batch}
            self._pending = deque(i for i in self._pending if id(i) not in taken and not i.cancelled)
            self.num_running = len(batch)
            return batch

    def _loop(self) -> None:
        try:
            while (batch := self._take()) is not None:
                try:
                    results = self.run_batch([i.token_ids for i in batch], [i.params for i in batch])
                except Exception as e:  # noqa: BLE001 - this batch's callers get it; the batcher goes on
                    logger.exception("an embedding batch of %d inputs failed", len(batch))
                    self._fail(batch, e)
                else:
                    for item, result in zip(batch, results):
                        _deliver(item, result, None)
                    self.batches_run += 1
                    self.inputs_run += len(batch)
                finally:
                    self.num_running = 0
        except BaseException as e:  # noqa: BLE001 - the worker is gone: nobody may wait forever
            logger.exception("the embedding worker died")
            self.dead_error = EngineDeadError("the embedding model stopped")
            with self._cond:
                waiting = list(self._pending)
                self._pending.clear()
            self._fail(waiting, self.dead_error)
            if not isinstance(e, Exception):
                raise

    @staticmethod
    def _fail(items: list[_Item], error: BaseException) -> None:
        for item in items:
            _deliver(item, None, error)


def _deliver(item: _Item, result, error: BaseException | None) -> None:
    def settle() -> None:
        if item.future.done():  # cancelled meanwhile
            return
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)
    try:
        item.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop is closed: nobody is waiting
        pass
