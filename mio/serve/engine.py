"""The server's engine: one thread owns the model and decodes every request in one running
batch (continuous batching); the web side waits on tickets.

A request becomes a :class:`Job` (its turns and generation options, the keywords of
:meth:`Generator.generate`) and is submitted; :meth:`Engine.submit` refuses it at once when
``max_queue`` requests are already waiting or decoding (the web side answers 503). Between two
steps of the decoding loop the engine's thread starts every job submitted meanwhile
(:meth:`Decoder.start`: it joins at the next step, its prompt beside the others' one token);
a job that is done, or whose client went away, leaves the batch at once. Each row keeps its own
settings, constraint (the outputs its request allows) and seeded generator, so an answer is the
one it gets alone. After each step the thread writes each ticket's answer ids, and at the end
its :class:`Generation` (or the error that ended it); the web side awaits the ticket's changes on
its event loop. Media (a request's images and WAVs in, an answer's images and speech out) are
encoded and decoded on a second thread, so the model goes on decoding meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image as PILImage

from mio.generate.decoding import Decoder
from mio.generate.detok import DEFAULT_UNCLIP
from mio.generate.generator import Generator, Prepared
from mio.generate.results import Generation
from mio.segments import Image, Segment, Speech
from mio.templates import Turn

# Past this many masked columns beyond its longest row, the running batch takes no newcomer until it
# empties and starts afresh: under a steady stream of requests, joins would otherwise grow every
# row's attention and KV cache without bound (each join pads every row by the newcomer's prompt).
MAX_PADDING = 2048


@dataclass(frozen=True)
class GenerateOptions:
    """The keywords of :meth:`Generator.generate` a request sets."""

    chat: bool = True
    task: str | None = None
    preset: str = "paper"
    max_new_tokens: int | None = None
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: tuple[str, ...] | None = None
    seed: int = 0
    max_speech_frames: int = 750


@dataclass
class Job:
    turns: list[Turn]
    options: GenerateOptions


class Busy(RuntimeError):
    """The queue is full: the request is refused, to be retried later."""


class Ticket:
    """One submitted job, seen from the web side: its answer ids so far, then its generation or
    its error. Written by the engine's thread, awaited on the web side's event loop."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.loop = loop
        self.ids: list[int] = []  # the answer's ids so far (replaced whole, never mutated in place)
        self.generation: Generation | None = None
        self.error: BaseException | None = None
        self.cancelled = threading.Event()  # the client went away: the engine drops the job
        self.streamed = False  # wake the web side at every step (a stream), not only when it starts and ends
        self._changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.generation is not None or self.error is not None

    def cancel(self) -> None:
        self.cancelled.set()

    async def changed(self) -> None:
        """Return once the engine has written something new (at once if it already has)."""
        await self._changed.wait()
        self._changed.clear()

    async def result(self) -> Generation:
        while not self.done:
            await self.changed()
        if self.error is not None:
            raise self.error
        assert self.generation is not None
        return self.generation

    # --- the engine's side -------------------------------------------------------------
    def _notify(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._changed.set)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def progress(self, ids: list[int]) -> None:
        started = bool(self.ids)
        self.ids = list(ids)
        if self.streamed or not started:  # a waiting handler only wants the start (errors come before it)
            self._notify()

    def finish(self, generation: Generation) -> None:
        self.ids = list(generation.result.ids)
        self.generation = generation
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()


class Engine:
    """The model's thread and its bounded queue."""

    def __init__(self, generator: Generator, max_queue: int) -> None:
        self.generator = generator
        self.max_queue = max_queue
        self._jobs: queue.Queue[Ticket | None] = queue.Queue()
        self._lock = threading.Lock()
        self._open = 0  # tickets submitted and not yet done
        self._thread = threading.Thread(target=self._work, name="mio-engine", daemon=True)
        self._media = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mio-media")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()
        self._media.shutdown(wait=True)

    @property
    def open_jobs(self) -> int:
        return self._open

    def submit(self, job: Job, streamed: bool = False) -> Ticket:
        """Queue ``job``; :class:`Busy` when ``max_queue`` jobs are already open. ``streamed``: its
        ticket wakes the web side at every step, not only when the job starts and ends."""
        ticket = Ticket(job, asyncio.get_running_loop())
        ticket.streamed = streamed
        with self._lock:
            if self._open >= self.max_queue:
                raise Busy(f"the server has {self._open} requests open, its limit (--max-queue {self.max_queue})")
            self._open += 1
        self._jobs.put(ticket)
        return ticket

    def _closed(self) -> None:
        with self._lock:
            self._open -= 1

    def _work(self) -> None:
        """The running batch: jobs join it at the next step, done and cancelled ones leave at once
        (the one decoding loop of :class:`Decoder`, as ``generate_batch`` runs it)."""
        decoder = Decoder(self.generator.model)
        running: dict[int, tuple[Ticket, Prepared, Any]] = {}  # id(sequence) -> (ticket, prepared, sequence)
        closing = False
        while not closing or running:
            if not running or decoder.padding <= MAX_PADDING:
                closing = self._admit(decoder, running, wait=not running) or closing
            for ticket, _, seq in running.values():
                if ticket.cancelled.is_set():
                    decoder.cancel(seq)
            try:
                ended = decoder.step()
            except Exception as err:  # noqa: BLE001 -- the model failed: every running job fails, the thread serves on
                for ticket, _, _ in running.values():
                    ticket.fail(err)
                    self._closed()
                running.clear()
                decoder = Decoder(self.generator.model)
                continue
            for seq in ended:
                ticket, prepared, _ = running.pop(id(seq))
                try:
                    if seq.cancelled:
                        ticket.fail(asyncio.CancelledError("the client went away"))
                    else:
                        ticket.finish(self.generator.finish(prepared, seq.result))
                except Exception as err:  # noqa: BLE001 -- an answer that cannot be parsed fails its request only
                    ticket.fail(err)
                finally:
                    self._closed()
            for ticket, _, seq in running.values():
                if len(seq.result.ids) != len(ticket.ids):
                    ticket.progress(seq.result.ids)

    def _admit(self, decoder: Decoder, running: dict[int, tuple[Ticket, Prepared, Any]], wait: bool) -> bool:
        """Start every queued job (waiting for one when ``wait``); True once the queue is closed."""
        while True:
            try:
                ticket = self._jobs.get(block=wait)
            except queue.Empty:
                return False
            wait = False
            if ticket is None:
                return True
            if ticket.cancelled.is_set():
                ticket.fail(asyncio.CancelledError("the client went away"))
                self._closed()
                continue
            try:
                o = ticket.job.options
                prepared = self.generator.prepare_batch(
                    [ticket.job.turns], chat=o.chat, task=o.task, preset=o.preset, max_new_tokens=o.max_new_tokens,
                    settings=o.settings, outputs=o.outputs, seed=o.seed, max_speech_frames=o.max_speech_frames)[0]
                seq = decoder.start(prepared.ids, prepared.max_new_tokens, prepared.seed, prepared.settings,
                                    prepared.constraint, prepared.stop_ids)
            except Exception as err:  # noqa: BLE001 -- a request the model cannot take fails alone
                ticket.fail(err)
                self._closed()
                continue
            running[id(seq)] = (ticket, prepared, seq)

    # --- media, on the media thread ------------------------------------------------------
    async def encode(self, turns: list[Turn]) -> list[Turn]:
        """The turns' media files -> code segments (the generator's own encoding)."""
        return await asyncio.get_running_loop().run_in_executor(self._media, self.generator.encode_turns, turns)

    async def render(self, image: Segment) -> tuple[str, bytes]:
        """An answer's image segment -> ("image/png", PNG bytes)."""
        return await asyncio.get_running_loop().run_in_executor(self._media, self._png, image)

    async def render_speech(self, speech: list[Segment]) -> tuple[str, bytes]:
        """An answer's speech segments -> ("audio/wav", one WAV of them, one after another)."""
        return await asyncio.get_running_loop().run_in_executor(self._media, self._wav, speech)

    def _png(self, image: Segment) -> tuple[str, bytes]:
        if not isinstance(image, Image):
            raise TypeError(f"cannot render a {type(image).__name__} segment as an image")
        picture: PILImage.Image = self.generator.image_decoder(DEFAULT_UNCLIP).decode(np.asarray(image.codes)[None])[0]
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        return "image/png", buf.getvalue()

    def _wav(self, speech: list[Segment]) -> tuple[str, bytes]:
        import soundfile as sf

        dec = self.generator.speech_decoder()
        wave = np.concatenate([dec.decode(np.asarray(s.codes)) for s in speech if isinstance(s, Speech)])  # (T,)
        buf = io.BytesIO()
        sf.write(buf, np.clip(wave, -1.0, 1.0), dec.sample_rate, format="WAV", subtype="PCM_16")
        return "audio/wav", buf.getvalue()
