"""How requests reach a share without making the FUSE loop wait for it (issue 12).

Rules (docs/design-notes.md, "Requests in flight"):

1. The trio thread owns every in-memory structure (views and their chunks, tables, refcounts,
   dirty sets), with two exceptions. The FUSE reader threads (vfsnap/fs/relay.py) read
   resolved chunks, which are replaced, never changed (`View.read_now`, `View._patch`); and a
   reader thread answering a write holds the volume's write lock like a worker (rule 4) and
   patches its new extents into the chunks itself, under `MAP_LOCK` (vfsnap/chain/view.py),
   which also orders it with the loop's resolution of the same chunk (`View._chunk`). Both
   run inside the volume's request gate (`RequestGate.enter_now`). A worker thread runs only
   blocking system calls on a share descriptor, or a piece of the qcow2 writer while the
   volume's write lock hands the image's write state to it (`View.write_async`; a clone's
   copy step), or a merge's copy step, whose target's write state is the merge's alone
   (`Merge.copy_step`): never code that touches a view's chunks. Tables they load are cached
   only if the image's tables did not change meanwhile (its epoch).
2. Each share has its own bounded pool of worker threads (`share_threads`): a share that
   hangs ties up its own threads, never another share's.
3. A share is *not answering* while one of its calls has been outstanding for longer than
   `HUNG_AFTER` seconds, or a metadata call of the loop gave up waiting for it. Metadata calls
   made from the loop (`answer`: stat, listdir, `.info`, statvfs) wait at most `ANSWER_WAIT`
   seconds; after that, and while the share is not answering, they raise `ShareNotAnswering`
   at once and the callers answer from the last known state.

Which data calls go to threads (`threaded`): on network shares (NFS, GlusterFS) all of them; on
a local directory only reads the page cache cannot answer (`share_io=threads` forces the
network behaviour, `share_io=inline` the local one). A hand-off to a thread costs tens of
microseconds, which is most of a page-cache hit on a local disk.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import queue
import threading
import time

import outcome
import trio

from vfsnap.errors import ShareNotAnswering

# A call outstanding this long makes the share "not answering".
HUNG_AFTER = 1.0
# How long a metadata call from the loop waits for the share before answering from memory.
ANSWER_WAIT = 0.5
DEFAULT_THREADS = 16
METADATA_THREADS = 4


class ShareIO:
    def __init__(self, path: str, *, threads: int = DEFAULT_THREADS, threaded: bool = False):
        self.path = path
        self.threaded = threaded  # data calls (writes, flushes) on worker threads
        self.threads = max(1, threads)
        # The share's own workers, a plain queue and a direct wake-up of the waiting task:
        # measured on a busy 2-core machine, 45 us per hand-off against 150 us through
        # trio.to_thread.run_sync (16 against 240 us with 8 in flight). Started at first use,
        # in the daemon (threads do not survive its fork).
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the registry is changed by worker threads too
        self._in_flight: dict[int, tuple[float, str]] = {}
        self._gave_up: set[int] = set()  # metadata calls the loop stopped waiting for
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_pid = 0
        # Finished calls waiting for the loop, handed over in batches: one wake-up of the loop
        # (a write to trio's wake-up socket, a read to drain it) serves every call that finished
        # before the loop came round, instead of one each.
        self._done: collections.deque = collections.deque()
        self._done_lock = threading.Lock()
        self._delivery_pending = False
        # Reads a FUSE reader thread answers itself (`run_here`), bounded like the workers: a
        # share that hangs holds at most this many of the mount's readers (rule 2).
        self._here = 0

    # -- health -----------------------------------------------------------------------------

    def _begin(self, what: str) -> int:
        token = next(self._ids)
        with self._lock:
            self._in_flight[token] = (time.monotonic(), what)
        return token

    def _end(self, token: int) -> None:
        with self._lock:
            self._in_flight.pop(token, None)
            self._gave_up.discard(token)

    @property
    def not_answering(self) -> bool:
        with self._lock:
            return self._hung(time.monotonic())

    def _hung(self, now: float) -> bool:
        """`not_answering`, under the lock."""
        return bool(self._gave_up) or bool(self._in_flight) and now - self._oldest()[0] > HUNG_AFTER

    def _oldest(self) -> tuple[float, str]:
        # Calls enter the registry with their start time read under the lock, so in the order
        # of their start: the first left is the oldest (a dict keeps insertion order).
        return next(iter(self._in_flight.values()))

    def oldest_call(self) -> tuple[float, str] | None:
        """(seconds outstanding, what) of the oldest call in flight, for `vfsnap status`."""
        with self._lock:
            if not self._in_flight:
                return None
            start, what = self._oldest()
        return time.monotonic() - start, what

    # -- data calls (awaited by request handlers) ---------------------------------------------

    async def run(self, what: str, fn, *args):
        """Run a blocking call on one of the share's threads; the loop serves others meanwhile.

        Not cancellable: a thread cannot be stopped, and its descriptor must stay open until
        it returns (whoever closes descriptors waits for the volume's requests first)."""
        if not self._workers:
            self._start_workers()
        token = self._begin(what)
        try:
            self._jobs.put((fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
            # The worker's outcome, unwrapped: its value, or its exception raised here.
            return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        finally:
            self._end(token)

    def run_here(self, what: str, fn, *args):
        """`run` on the calling thread, a FUSE reader (vfsnap/fs/relay.py), counted in flight
        the same way (rule 3). Returns None without calling `fn` while the share is not
        answering or `threads` such calls are under way: the request then takes the loop's way,
        to the share's own workers, and the reader is free for other shares' requests."""
        token = next(self._ids)
        with self._lock:  # one lock for the bound, the health check and the registry
            now = time.monotonic()
            if self._here >= self.threads or self._hung(now):
                return None
            self._here += 1
            self._in_flight[token] = (now, what)
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._here -= 1
                del self._in_flight[token]

    def _start_workers(self) -> None:
        for i in range(self.threads):
            worker = threading.Thread(target=self._work, name=f"share-io-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, trio_token, task = job
            result = outcome.capture(fn, *args)
            with self._done_lock:
                self._done.append((task, result))
                if self._delivery_pending:
                    continue  # the loop is already called: it takes this one too
                self._delivery_pending = True
            try:
                trio_token.run_sync_soon(self._deliver)
            except trio.RunFinishedError:  # the mount ended while this call waited for the share
                with self._done_lock:
                    self._done.clear()
                    self._delivery_pending = False

    def _deliver(self) -> None:
        """On the loop: wake every task whose call finished (see `_done`)."""
        with self._done_lock:
            done = list(self._done)
            self._done.clear()
            self._delivery_pending = False
        for task, result in done:
            trio.lowlevel.reschedule(task, result)

    async def write(self, what: str, fn, *args):
        """A data call that is quick on a local disk (a write into the page cache): inline there,
        on a thread where the share may be far away or hang."""
        if not self.threaded:
            return fn(*args)
        return await self.run(what, fn, *args)

    # -- metadata calls (made synchronously from the loop) ------------------------------------

    def answer(self, what: str, fn, *args):
        """`fn(*args)`, but never waiting more than ANSWER_WAIT for a share that may hang:
        raises ShareNotAnswering instead. Inline on local shares and on worker threads (the loop
        runs on the main thread)."""
        if not self.threaded or threading.current_thread() is not threading.main_thread():
            return fn(*args)
        if self._executor is None or self._executor_pid != os.getpid():
            # Made anew in a forked daemon: the parent's threads did not come along (the shares
            # are opened, and looked at, before `vfsnap mount` daemonizes).
            self._executor = concurrent.futures.ThreadPoolExecutor(METADATA_THREADS, thread_name_prefix="share-meta")
            if self._executor_pid:
                self._lock = threading.Lock()  # a parent's thread may have held it at the fork
                self._in_flight.clear()  # the parent's calls: never to end here
                self._gave_up.clear()
            self._executor_pid = os.getpid()
        if self.not_answering:
            raise ShareNotAnswering(f"{self.path}: share is not answering ({what})")
        token = self._begin(what)
        future = self._executor.submit(fn, *args)
        future.add_done_callback(lambda _: self._end(token))
        try:
            return future.result(timeout=ANSWER_WAIT)
        except concurrent.futures.TimeoutError:
            with self._lock:
                if token in self._in_flight:
                    self._gave_up.add(token)
            raise ShareNotAnswering(f"{self.path}: share did not answer within {ANSWER_WAIT} s ({what})") from None

    def close(self) -> None:
        for _ in self._workers:
            self._jobs.put(None)
        self._workers.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _on_loop(fn, trio_token) -> None:
    """`fn()` on the loop: here when called there (`trio_token` None), else soon, through the
    loop's token (from a FUSE reader thread); not at all once the loop has ended."""
    if trio_token is None:
        fn()
        return
    try:
        trio_token.run_sync_soon(fn)
    except trio.RunFinishedError:
        pass


class WriteLock:
    """The volume's write lock (RequestGate rule 4), taken by tasks on the loop (`async with`)
    and by FUSE reader threads answering writes themselves (`acquire_now`).

    A thread blocks for it; a task never blocks the loop: it waits for a release, which a
    thread hands to the loop through the trio token. New thread writers stand back while a
    task waits (a flush, a chain change), so that a stream of writes cannot starve it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks_waiting = 0  # changed on the loop only; read by threads
        self._released = trio.Event()

    def locked(self) -> bool:
        return self._lock.locked()

    async def acquire(self) -> None:
        while not self._lock.acquire(blocking=False):
            released = self._released
            self._tasks_waiting += 1
            try:
                # Once more after counting ourselves: a thread that released before it could
                # see the count did not wake us, but left the lock free.
                if self._lock.acquire(blocking=False):
                    return
                await released.wait()
            finally:
                self._tasks_waiting -= 1

    def acquire_now(self) -> bool:
        """On a FUSE reader thread: wait for the lock, or False at once while a task waits."""
        if self._tasks_waiting:
            return False
        self._lock.acquire()
        return True

    def release(self, trio_token=None) -> None:
        """From the loop, or from a thread with the loop's `trio_token`."""
        self._lock.release()
        if self._tasks_waiting:
            _on_loop(self._wake, trio_token)

    def _wake(self) -> None:
        self._released.set()
        self._released = trio.Event()

    async def __aenter__(self):
        await self.acquire()
        return self

    async def __aexit__(self, *exc_info):
        self.release()


class RequestGate:
    """The requests of one volume in flight, and the moments none may be (rules 4-6).

    4. `write_lock`: the image's write state (refcounts, dirty L2/L1 tables, the clusters known
       writable in place) belongs to whoever holds it: one write or one flush of the volume at
       a time, on the loop, handed to a worker thread with it, or on the FUSE reader thread
       that read the write (`WriteLock.acquire_now`). Writes of one volume are thus
       serialized (two writers never allocate the same cluster; a flush never sees half of a
       write), and a flush waits for the writes before it: data -> refcounts -> L2 -> L1 holds.
    5. A write changes what readers see only when its data is on the share: the new mapping is
       patched into the view after the data is written (on the loop after the worker
       returned, or on the reader thread before it answers) (QEMU's in-flight
       allocation rule, made simpler by the lock: a read in flight sees the old data or the new).
       Clusters a write freed are handed back to the refcounts only after every read begun
       before has finished (`drain(reads_only=True)`): no read can see a reused cluster.
    6. `quiesced()`: chain changes (snapshot, merge commit, rename, removal, resize, reopening
       or re-validating images) hold new requests back and wait for those in flight, so that
       no worker thread uses a descriptor they close or replace.
    """

    def __init__(self) -> None:
        self.write_lock = WriteLock()
        # Reads and writes answered on the FUSE reader threads (vfsnap/fs/relay.py) enter and leave from
        # those threads: the numbers, the requests in flight, `_closed` and `_waiters` change
        # under this lock, and a drain counts itself waiting in the same step that found a
        # request in flight, so that a thread leaving right after wakes it.
        self._mutex = threading.Lock()
        self._seq = 0
        self._active: dict[int, bool] = {}  # request number -> is a read
        self._closed = 0
        self._waiters = 0
        self._changed = trio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def reads_in_flight(self) -> bool:
        with self._mutex:
            return any(self._active.values())

    async def enter(self, *, read: bool) -> int:
        while True:
            with self._mutex:
                if not self._closed:
                    self._seq += 1
                    self._active[self._seq] = read
                    return self._seq
                self._waiters += 1
            await self._wait()

    def leave(self, seq: int, trio_token=None) -> None:
        """A request is done. From a FUSE reader thread, with the loop's `trio_token`: a
        waiting drain is then woken on the loop."""
        with self._mutex:
            del self._active[seq]
            wake = self._waiters > 0
        if wake:
            _on_loop(self._notify, trio_token)

    def enter_now(self, *, read: bool = True) -> int | None:
        """A request entering from a FUSE reader thread: its number, or None while a chain
        change holds requests back (the request then goes the loop's way and waits there)."""
        with self._mutex:
            if self._closed:
                return None
            self._seq += 1
            self._active[self._seq] = read
            return self._seq

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait(self) -> None:
        """Wait for the next change; the caller counted itself in `_waiters` under the lock."""
        try:
            await self._changed.wait()
        finally:
            with self._mutex:
                self._waiters -= 1

    async def drain(self, *, reads_only: bool = False) -> None:
        """Wait until the requests (or reads) begun so far have finished."""
        with self._mutex:
            mark = self._seq
        while True:
            with self._mutex:
                if not any(seq <= mark and (read or not reads_only) for seq, read in self._active.items()):
                    return
                self._waiters += 1
            await self._wait()

    def close(self) -> None:
        with self._mutex:
            self._closed += 1

    def reopen(self) -> None:
        with self._mutex:
            self._closed -= 1
            wake = self._waiters > 0
        if wake:
            self._notify()

    def quiesced(self):
        return _Quiesced(self)


class _Quiesced:
    def __init__(self, gate: RequestGate):
        self.gate = gate

    async def __aenter__(self):
        gate = self.gate
        gate.close()
        try:
            await gate.drain()
            await gate.write_lock.acquire()
        except BaseException:
            gate.reopen()
            raise
        return self

    async def __aexit__(self, *exc_info):
        gate = self.gate
        gate.write_lock.release()
        gate.reopen()
