"""Streamed responses that a slow reader cannot hold open: every write must complete within
``router.stream_write_timeout_s``.

A client that stops reading fills its socket; each write then waits for it to drain. Without
a bound, its generation keeps its admission slot and its worker keeps generating into the
router until ``max_tokens``. Past the bound the response is cut off: its body iterator is
closed, which closes the generation (the worker request cancelled, its blocks and slot freed,
counted ``cancelled``), and ``pdserve_slow_readers_total{why="write_timeout"}`` counts it.
The other bound, token chunks waiting at the router (``router.stream_max_unsent_chunks``), is
kept where the chunks arrive (``router/workers.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.responses import StreamingResponse
from starlette.types import Message, Send

logger = logging.getLogger(__name__)


class SlowReader(Exception):
    """One write to the client took longer than the bound."""


class BoundedStreamingResponse(StreamingResponse):
    """``StreamingResponse`` whose every ``send`` has ``write_timeout_s``; ``on_slow`` runs
    once the response is cut off."""

    def __init__(self, *args, write_timeout_s: float, request_id: str,
                 on_slow: Callable[[], None], **kwargs):
        super().__init__(*args, **kwargs)
        self.write_timeout_s = write_timeout_s
        self.request_id = request_id
        self.on_slow = on_slow

    async def stream_response(self, send: Send) -> None:
        async def bounded_send(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), self.write_timeout_s)
            except asyncio.TimeoutError:
                raise SlowReader from None

        try:
            await super().stream_response(bounded_send)
        except SlowReader:
            await self.body_iterator.aclose()  # the generation closes: worker request cancelled
            self.on_slow()
            logger.warning("request %s: cut off, the client read nothing for %.1f s",
                           self.request_id, self.write_timeout_s)
