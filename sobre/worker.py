"""The engine behind `sobre serve`: in a thread of the server's process (EngineThread, for an Engine made in
Python) or in a process of its own (EngineProcess, `sobre serve`'s default, as vLLM runs its engine core).

In its own process the engine's Python between ops never waits on the HTTP event loop for the GIL: on 2 CPU
cores a B=16 decode step took 10 ms inside the server's process against 7.7 ms alone, and a thread doing half
a core of Python work beside a bare engine doubled its step (the same work in another process: +3%).
In a thread the engine runs on one torch thread by default, as EngineProcess does: libgomp (torch's OpenMP)
keeps a thread team per thread that runs parallel ops, and once it manages more threads than there are cores
(the main thread's team, which loaded the model, and the engine thread's) its idle threads stop spinning and
sleep between ops; each op then waits for them to wake. 8 sequences x 198 tokens of tests/test_serve.py's
model on 2 cores: 0.6-0.9 s in the main thread, 4.5-5.9 s in a thread of 2 torch threads, 0.46 s of 1.

Both run a Worker: between steps it takes commands from its inbox (add / cancel / stop); after each step it
emits one batch of (key, item) for the requests it touched (item: an Event, a Done, or an exception that
fails the request), with a snapshot of the engine's counts. The front end (EngineClient) keys requests by
int, keeps each key's Sink (its HTTP request's asyncio queue), and hands a batch to each event loop in one
call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
from dataclasses import dataclass

import torch

from .engine import Engine
from .request import Limits

log = logging.getLogger("sobre.serve")


@dataclass
class Sink:
    """Where one request's items go: (index, item) onto its HTTP request's asyncio queue."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    key: int | None = None


@dataclass
class Done:
    """A request's end as the server needs it (its Sequence holds tensors and stays with the engine)."""
    finish_reason: str
    cached: int  # prompt tokens served from the prefix cache
    text: str  # with stop strings: the text up to where one matched


def deliver(batch: list[tuple[Sink, object]]):
    """Called on the event loop, once per engine step (one wake-up, however many tokens)."""
    for sink, item in batch:
        sink.queue.put_nowait((sink.index, item))


class Worker:
    """Owns the engine: admits requests and cancellations from the inbox between steps, steps while any
    sequence is waiting or running, sleeps on the inbox otherwise."""

    def __init__(self, engine: Engine, inbox, emit, alive=lambda: True):
        self.engine, self.inbox, self.emit, self.alive = engine, inbox, emit, alive
        self.keys: dict[int, int] = {}  # engine request id -> request key
        self.rids: dict[int, int] = {}  # request key -> engine request id
        self.cancelled = 0  # requests cancelled before they finished (client gone, timeout)

    def run(self):
        while self.alive():
            items: list = []
            running, touched = self._drain(items, block=not self.engine.has_work())
            if not running:
                return
            if self.engine.has_work():
                items += self._step()
            if items or touched:
                self.emit(items, self.counts())

    def counts(self) -> dict:
        e = self.engine
        return {"running": e.in_flight(), "blocks": e.pool.n_blocks - 1, "cancelled": self.cancelled,
                "blocks_free": e.pool.available(), **{f"spec_{k}": v for k, v in e.spec_stats.items()},
                **{f"prefix_{k}": v for k, v in e.prefix_stats.items()}}

    def _drain(self, items: list, block: bool) -> tuple[bool, bool]:
        """Take every command waiting (the first one blocking up to 1 s when idle) -> (not stopped, any taken)."""
        touched = False
        while True:
            try:
                cmd = self.inbox.get(timeout=1.0) if block else self.inbox.get_nowait()
            except queue.Empty:
                return True, touched
            block, touched = False, True
            if cmd[0] == "stop":
                return False, touched
            if cmd[0] == "add":
                _, key, prompt, params = cmd
                try:
                    rid = self.engine.add_request(prompt, params)
                except ValueError as e:
                    items.append((key, e))
                    continue
                self.keys[rid], self.rids[key] = key, rid
            elif cmd[0] == "cancel" and cmd[1] in self.rids:
                rid = self.rids.pop(cmd[1])
                del self.keys[rid]
                self.engine.cancel(rid)
                self.engine.collect()
                self.cancelled += 1

    def _step(self) -> list:
        try:
            events = self.engine.step()
        except Exception as e:  # an engine failure fails the requests in flight, never the server
            log.exception("engine step failed")
            for rid in self.keys:
                self.engine.cancel(rid)
            self.engine.collect()
            out = [(key, RuntimeError(f"engine failure: {e}")) for key in self.keys.values()]
            self.keys.clear()
            self.rids.clear()
            return out
        out = [(self.keys[ev.rid], ev) for ev in events if ev.rid in self.keys]
        for rid, seq in self.engine.collect().items():
            if rid in self.keys:
                key = self.keys.pop(rid)
                del self.rids[key]
                out.append((key, Done(seq.finish_reason, seq.cached, seq.text)))
        return out


class EngineClient:
    """The server's side of an engine: check / submit / cancel requests, the latest counts, close."""

    def __init__(self, inbox, config, tokenizer, limits: Limits, counts: dict):
        self.inbox, self.config, self.tokenizer, self.limits, self.counts = inbox, config, tokenizer, limits, counts
        self.sinks: dict[int, Sink] = {}
        self.next_key = 0
        self.error: str | None = None  # why the engine is gone (its process died)

    def queued(self) -> int:
        """Requests submitted and not yet in the running batch."""
        return max(len(self.sinks) - self.counts["running"], 0)

    def submit(self, prompt: list[int], params, sink: Sink):
        """ValueError (-> 400) when the request cannot run; RuntimeError when the engine is gone."""
        if self.error:
            raise RuntimeError(self.error)
        self.limits.check(prompt, params)
        sink.key, self.next_key = self.next_key, self.next_key + 1
        self.sinks[sink.key] = sink
        self.inbox.put(("add", sink.key, prompt, params))

    def cancel(self, sink: Sink):
        if self.sinks.pop(sink.key, None) is not None and not self.error:
            self.inbox.put(("cancel", sink.key))

    def deliver(self, items: list, counts: dict):
        """A batch from the worker (its thread, or the reader thread of a process): to each event loop."""
        self.counts = counts
        loops: dict = {}
        for key, item in items:
            sink = self.sinks.pop(key, None) if isinstance(item, (Done, Exception)) else self.sinks.get(key)
            if sink is not None:
                loops.setdefault(sink.loop, []).append((sink, item))
        for loop, batch in loops.items():
            loop.call_soon_threadsafe(deliver, batch)

    def close(self):
        raise NotImplementedError


class EngineThread(EngineClient):
    """An Engine object, run by a Worker in a thread of this process on `threads` torch threads (that thread's
    own setting: the caller's threads keep theirs)."""

    def __init__(self, engine: Engine, threads: int = 1):
        self.engine, inbox = engine, queue.Queue()
        worker = Worker(engine, inbox, self.deliver)
        super().__init__(inbox, engine.model.config, engine.tokenizer, engine.limits, worker.counts())
        self.thread = threading.Thread(target=run_on, args=(threads, worker), name="sobre-engine", daemon=True)
        self.thread.start()

    def close(self):
        self.inbox.put(("stop",))
        self.thread.join(timeout=10)


def run_on(threads: int, worker: Worker):
    torch.set_num_threads(threads)
    worker.run()


class EngineProcess(EngineClient):
    """Engine.from_pretrained(path, **kw) in a spawned process with `threads` torch threads (warm_up: compile
    its decode graphs before serving). Commands go over a multiprocessing queue, batches come back over a pipe
    that a reader thread here waits on. If the process dies, its requests fail and new ones are refused."""

    def __init__(self, path, threads: int = 1, warm_up: bool = False, **kw):
        from .checkpoint import resolve
        path = str(resolve(path))
        ctx = mp.get_context("spawn")  # (fork would copy a CUDA context, and OpenMP's threads, broken)
        inbox, (self.conn, out), self.closing = ctx.Queue(), ctx.Pipe(duplex=False), False
        self.proc = ctx.Process(target=engine_process, args=(path, kw, threads, warm_up, inbox, out),
                                name="sobre-engine", daemon=True)
        self.proc.start()
        out.close()
        try:
            msg = self.conn.recv()
        except EOFError:
            msg = ("failed", "it exited")
        if msg[0] == "failed":
            self.proc.join(10)
            raise RuntimeError(f"the engine process could not start ({msg[1]}; exit code {self.proc.exitcode})")
        super().__init__(inbox, *msg[1:])  # the engine's own config and tokenizer: nothing loaded twice here
        self.reader = threading.Thread(target=self._read, name="sobre-engine-reader", daemon=True)
        self.reader.start()

    def _read(self):
        try:
            while True:
                self.deliver(*self.conn.recv())
        except (EOFError, OSError):
            pass
        if not self.closing:
            self.proc.join(5)
            self.error = f"the engine process exited (code {self.proc.exitcode}); restart the server"
            log.error(self.error)
            self.deliver([(key, RuntimeError(self.error)) for key in list(self.sinks)],
                         {**self.counts, "running": 0})

    def close(self):
        self.closing = True
        if self.proc.is_alive():
            self.inbox.put(("stop",))
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.inbox.cancel_join_thread()
        self.conn.close()


def engine_process(path: str, kw: dict, threads: int, warm_up: bool, inbox, out):
    """The engine process: load, report ("ready", config, tokenizer, limits, counts) or ("failed", why), then
    run the Worker until a stop command or until the server's process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops this process
    torch.set_num_threads(threads)
    try:
        engine = Engine.from_pretrained(path, **kw)
        if warm_up:
            engine.warm_up()
    except Exception as e:
        out.send(("failed", f"{type(e).__name__}: {e}"))
        return
    parent = os.getppid()
    worker = Worker(engine, inbox, lambda items, counts: out.send((items, counts)),
                    alive=lambda: os.getppid() == parent)
    out.send(("ready", engine.model.config, engine.tokenizer, engine.limits, worker.counts()))
    worker.run()
