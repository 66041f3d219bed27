"""The server's one worker thread: admission (a bounded queue), batched vision + Q-Former for
the requests waiting together, then the LLM one request at a time.

No HTTP here (the app bridges to it); a request is a :class:`Job` that the worker fills in
through two callbacks, ``on_text`` (each streamed delta) and ``on_done`` (a :class:`Completion`
or an exception), both called on the worker thread.

Scheduling. The worker takes every job that is waiting (up to ``max_batch``), runs their
vision encoder in one call (the embedding cache answers the images it has seen, so only new
images reach the ViT) and their Q-Former in one call (instructions right-padded to the longest,
mask 0 on the padding), and queues them for the LLM. Between two LLM requests it looks for new
arrivals again and prefills them the same way, so requests that arrive while one is generating
are batched too. The LLM runs one request at a time: its runtimes generate for batch 1 (the
fast path refuses a larger batch; transformers' would need padding and a KV cache per request).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

import numpy as np

from ib_edge.runtime.errors import IbEdgeError, InputError

log = logging.getLogger("ib_edge.serve")


class QueueFull(IbEdgeError):
    """More requests in flight than --max-queue."""


class Cancelled(IbEdgeError):
    """The client went away; its generation was stopped."""


@dataclasses.dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclasses.dataclass
class Completion:
    text: str                  # the whole answer, decoded as ib-run decodes it
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str         # "stop" (EOS) or "length" (max_new_tokens reached)
    timings_ms: dict[str, float]


@dataclasses.dataclass(eq=False)
class Job:
    """One admitted request: preprocessed inputs, generation options, where results go."""
    pixel_values: np.ndarray   # [1, 3, H, W]; a video bundle's: [F, 3, H, W], one row per frame
    enc: dict                  # PromptEncoder.encode output, batch 1
    params: GenParams
    on_text: object            # callable(str) | None: each new piece of text
    on_done: object            # callable(Completion | BaseException)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    t_submit: float = 0.0
    query_embeds: np.ndarray | None = None
    timings: dict = dataclasses.field(default_factory=dict)

    def cancel(self) -> None:
        self.cancelled.set()


def pad_qformer(encs: list[dict], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The Q-Former inputs of several prompts as one batch: ids right-padded with ``pad_id`` to the
    longest, attention mask 0 on the padding (as the processor pads a batch)."""
    n = max(e["qformer_input_ids"].shape[1] for e in encs)
    ids = np.full((len(encs), n), pad_id, np.int64)
    mask = np.zeros((len(encs), n), np.int64)
    for i, e in enumerate(encs):
        t = e["qformer_input_ids"].shape[1]
        ids[i, :t] = e["qformer_input_ids"][0]
        mask[i, :t] = e["qformer_attention_mask"][0]
    return ids, mask


class Engine:
    """Owns the pipeline while serving; every model call happens on its worker thread."""

    def __init__(self, pipe, *, max_queue: int, max_batch: int):
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be >= 1")
        self.pipe = pipe
        self.max_queue, self.max_batch = max_queue, max_batch
        eos = pipe.manifest.model.get("eos_token_id")
        self.eos_ids = set(eos) if isinstance(eos, list) else (set() if eos is None else {int(eos)})
        self.pad_id = int(pipe.manifest.model.get("qformer_pad_token_id", 0))
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._in_flight = 0        # admitted and not finished (waiting, prefilled or generating)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.batches: collections.Counter[int] = collections.Counter()  # prefill batch size -> count
        self.completed = 0
        self.cancelled = 0

    # --- admission (any thread) -----------------------------------------------------------
    def reserve(self) -> None:
        """Take a place in the queue or raise QueueFull; every reserve() is matched by one
        submit() or release()."""
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if self._in_flight >= self.max_queue:
                raise QueueFull(f"server busy: {self._in_flight} requests in flight (--max-queue {self.max_queue})",
                                hint="retry later")
            self._in_flight += 1

    def release(self) -> None:
        with self._cond:
            self._in_flight -= 1

    def submit(self, job: Job) -> None:
        """Queue a job whose place was reserved."""
        job.t_submit = time.perf_counter()
        with self._cond:
            self._waiting.append(job)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"in_flight": self._in_flight, "waiting": len(self._waiting), "max_queue": self.max_queue,
                    "max_batch": self.max_batch, "completed": self.completed, "cancelled": self.cancelled,
                    "prefill_batches": {str(k): v for k, v in sorted(self.batches.items())}}

    # --- the worker ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ib-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self, block: bool) -> list[Job]:
        with self._cond:
            while block and not self._waiting and not self._stop:
                self._cond.wait()
            n = min(len(self._waiting), self.max_batch)
            return [self._waiting.popleft() for _ in range(n)]

    def _loop(self) -> None:
        ready: collections.deque[Job] = collections.deque()
        while True:
            with self._cond:
                if self._stop:
                    break
            batch = self._take(block=not ready)
            if batch:
                ready.extend(self._prefill(batch))
                continue  # more may have arrived meanwhile: prefill them before the next decode
            if ready:
                self._decode(ready.popleft())
        for job in list(ready) + self._take(block=False):
            self._finish(job, Cancelled("the server is shutting down"))

    def _finish(self, job: Job, result) -> None:
        with self._cond:
            self._in_flight -= 1
            if isinstance(result, Completion):
                self.completed += 1
            elif isinstance(result, Cancelled):
                self.cancelled += 1
        try:
            job.on_done(result)
        except Exception:  # a broken callback must not kill the worker; it is a bug, so log it
            log.exception("on_done callback failed")

    def _prefill(self, batch: list[Job]) -> list[Job]:
        """Vision (through the cache) and Q-Former for ``batch`` in one call each."""
        live = []
        for job in batch:
            if job.cancelled.is_set():
                self._finish(job, Cancelled("client disconnected"))
            else:
                live.append(job)
        if not live:
            return []
        t0 = time.perf_counter()
        try:
            pv = np.concatenate([j.pixel_values for j in live])
            img = self.pipe.image_embeds(pv)
            t1 = time.perf_counter()
            rows = [j.pixel_values.shape[0] for j in live]  # a video job's frames share its instruction
            ids, mask = pad_qformer([j.enc for j in live], self.pad_id)
            q = self.pipe.query_embeds(img, np.repeat(ids, rows, axis=0), np.repeat(mask, rows, axis=0))
            t2 = time.perf_counter()
        except Exception as e:  # every job of the batch gets the error (InputError -> 400, else 500)
            if not isinstance(e, IbEdgeError):
                log.exception("prefill failed")
            for job in live:
                self._finish(job, e)
            return []
        self.batches[len(live)] += 1
        starts = np.cumsum([0] + rows)
        for i, job in enumerate(live):  # [1, F*Q, D]: a job's frames' queries in frame order
            job.query_embeds = q[starts[i]:starts[i + 1]].reshape(1, -1, q.shape[2])
            job.timings.update(queue=(t0 - job.t_submit) * 1e3, vision=(t1 - t0) * 1e3,
                               qformer=(t2 - t1) * 1e3, batch=float(len(live)))
        return live

    def _decode(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._finish(job, Cancelled("client disconnected"))
            return
        p = job.params
        first: list[float] = []

        def on_text(text: str) -> None:
            # the LLM runtimes call this once per new piece of text: the place to stop a
            # generation whose client has gone (the exception unwinds their decode loop)
            if job.cancelled.is_set():
                raise Cancelled("client disconnected")
            if not first:
                first.append(time.perf_counter())
            if job.on_text is not None:
                job.on_text(text)

        t0 = time.perf_counter()
        try:
            llm = self.pipe.llm
            ids = llm.generate(job.query_embeds, job.enc["input_ids"], job.enc["attention_mask"],
                               decode=self.pipe.prompts.decode, max_new_tokens=p.max_new_tokens,
                               temperature=p.temperature, top_p=p.top_p, seed=p.seed, on_text=on_text)
        except Cancelled as e:
            self._finish(job, e)
            return
        except Exception as e:
            if not isinstance(e, IbEdgeError):
                log.exception("generation failed")
            self._finish(job, e)
            return
        t1 = time.perf_counter()
        ids = [int(i) for i in ids.token_ids]
        stopped = bool(ids) and ids[-1] in self.eos_ids
        finish = "stop" if stopped or len(ids) < p.max_new_tokens else "length"
        job.timings.update(llm=(t1 - t0) * 1e3, first_text=((first[0] if first else t1) - job.t_submit) * 1e3,
                           total=(t1 - job.t_submit) * 1e3)
        self._finish(job, Completion(text=self.pipe.prompts.decode(ids), token_ids=ids,
                                     prompt_tokens=int(job.enc["input_ids"].shape[1]),
                                     finish_reason=finish, timings_ms=job.timings))


def batch_limit(manifest, wanted: int) -> int:
    """``wanted``, lowered to what the bundle's TensorRT engines were built for (the largest
    batch of their optimization profiles); ONNX graphs take any batch."""
    n = wanted
    for stage in ("vision", "qformer"):
        profiles = (manifest.artifact(stage).get("engine") or {}).get("profiles") or {}
        for prof in profiles.values():
            n = min(n, int(prof["max"][0]))
    return max(n, 1)


def check_params(p: GenParams) -> GenParams:
    """The same limits as ib-run's options, as InputErrors."""
    if not 1 <= p.max_new_tokens <= 4096:
        raise InputError(f"max_tokens must be between 1 and 4096, got {p.max_new_tokens}")
    if not 0.0 <= p.temperature <= 2.0:
        raise InputError(f"temperature must be between 0 and 2, got {p.temperature}")
    if not 0.0 < p.top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {p.top_p}")
    return p
