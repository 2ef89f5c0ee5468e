"""Warm workers: a template process that imports torch once and forks workers from it.

A worker's first job spends ~4 s of CPU importing torch, diffusers and transformers before it
touches a model.  The engine pays that again for every worker it starts: one per device, and a
fresh one after each crash, OOM or kill.  So the pool of a box (engine.server.supervisor.LocalWorkers)
keeps one *zygote*, `python -m engine.server.zygote`: it imports the job code once (`PRELOAD`), never
runs a job, never touches CUDA, and forks a worker whenever the engine asks.  The fork starts in
milliseconds, already warm, and runs `engine.worker.main` exactly as `python -m engine.worker.main` would.

How the engine and the zygote talk: a SOCK_SEQPACKET socket pair, one JSON record per message.
    engine -> zygote  {"op": "spawn", "env": {...}, "home": ...} with the worker's stdin and
                      stdout pipe ends attached (SCM_RIGHTS)       reply {"pid": N} or {"error": ...}
    engine -> zygote  {"op": "preload"}                           reply {"preloaded": bool, "why": ...}
    engine -> zygote  {"op": "ready"}                             reply {"ready": true} (a shared one, once preloaded)
    zygote -> engine  {"exit": pid, "code": c} whenever a worker it forked ends (c as Popen's returncode)
The worker's pipes are the engine's own, so the engine reads and writes it as it does a worker it
started itself; only its exit code comes through the zygote.  The zygote dies with the engine
(PR_SET_PDEATHSIG) and its workers with it.

Forking is safe only while nothing in the zygote has initialised CUDA: a child of a process that
has cannot use the GPU.  After the preload the zygote checks that torch has not initialised CUDA and
that the CUDA driver (libcuda) is not even loaded; if either is, it says so and the engine starts
workers the plain way instead.  So does `TISTUDIO_WORKER_FORK=0`, and any platform but Linux.

One zygote can serve several engines of one box: `python -m engine.server.zygote --listen PATH`
preloads at once and takes an engine per connection on that Unix socket; an engine whose
environment names it (`TISTUDIO_ZYGOTE=PATH`) connects there instead of starting its own.  Each
worker's exit goes to the engine that asked for it, and when an engine's connection closes its
workers are killed.  It serves only engines of its own Python, code and PYTHONPATH (what it
preloaded); any other is told so and starts its own workers.  The test suite runs one for all
the engines its tests start (tests/shared_zygote.py): each would otherwise import torch again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import select
import signal
import socket
import struct
import sys
import traceback

FORK_ENV = "TISTUDIO_WORKER_FORK"  # "0": start every worker as its own `python -m engine.worker.main`
SHARED_ENV = "TISTUDIO_ZYGOTE"  # the socket of a zygote serving every engine of the box (`--listen`)
log = logging.getLogger("tistudio.engine")
RECORD = 1 << 16  # the largest message either side sends (an environment is a few KB)

# What a job imports before its first step (torch, the model classes, the job code).  Importing
# them here, once, is what makes a forked worker warm.
PRELOAD = (
    "torch",
    "safetensors.torch",
    "transformers",
    "diffusers",
    "engine.sd.models",
    "engine.inversion.train",
    "engine.sd.generation",
    "engine.worker.experiments",
    "engine.inversion.metrics",
    "open_clip",  # the CLIP judge of eval and experiments (optional: absent, it is skipped)
)
OPTIONAL = {"open_clip"}
# Names whose first access makes diffusers and transformers import their lazy submodules.
PRELOAD_ATTRS = {
    "diffusers": ("UNet2DConditionModel", "AutoencoderKL", "DDPMScheduler", "DPMSolverMultistepScheduler",
                  "StableDiffusionPipeline", "StableDiffusionXLPipeline"),
    "transformers": ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer"),
}


def disabled_because() -> str | None:
    """Why the engine must not fork workers from a zygote here, or None."""
    if not sys.platform.startswith("linux"):
        return "workers fork only on Linux"
    if os.environ.get(FORK_ENV, "1") == "0":
        return f"{FORK_ENV}=0"
    return None


# -- the zygote process --------------------------------------------------------------------------


def preload() -> tuple[bool, str | None]:
    """Import the job code; (True, None) when workers forked now will be warm and safe, else
    (False, why)."""
    import gc
    import importlib

    # If anything asks torch whether CUDA is there while importing, let it ask NVML, which
    # leaves the CUDA driver alone (a cudaGetDeviceCount here would poison every fork).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    gc.disable()  # importing makes millions of objects and no garbage: ~20% faster without collections
    try:
        for name in PRELOAD:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError:
                if name in OPTIONAL:
                    continue
                raise
            for attr in PRELOAD_ATTRS.get(name, ()):
                getattr(module, attr, None)
    except Exception as exc:  # noqa: BLE001 - a broken install: workers then fail as they would cold
        return False, f"preloading failed: {type(exc).__name__}: {exc}"
    finally:
        # What was imported lives as long as the process: keep the collector (here and in every
        # worker forked from here) from walking it again, and from touching the pages a fork shares.
        gc.freeze()
        gc.enable()
    return fork_safe()


def fork_safe() -> tuple[bool, str | None]:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return False, "torch initialised CUDA while importing"
    try:
        with open("/proc/self/maps") as maps:
            if any("libcuda.so" in line for line in maps):
                return False, "the CUDA driver was loaded while importing"
    except OSError:
        pass
    return True, None


def identity(env: dict[str, str] | os._Environ = os.environ) -> dict:
    """What a forked worker inherits from its zygote rather than from its engine: the Python, the
    engine's code and the module path.  A zygote serves only engines with the same.  The folder
    above the engine package, which every engine's environment puts first on PYTHONPATH
    (engine.wire.client.EngineClient._spawn), is the engine's code and is not counted twice: a
    zygote started by hand, without it, serves those engines."""
    import engine

    code = os.path.dirname(os.path.abspath(engine.__file__))
    path = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"python": sys.executable, "engine": code,
            "pythonpath": [p for p in path if p != os.path.dirname(code)]}


class Zygote:
    """Serves one engine over `sock`, or (`listener`) every engine that connects."""

    def __init__(self, sock: socket.socket | None = None, listener: socket.socket | None = None):
        self.conns: list[socket.socket] = [sock] if sock is not None else []
        self.listener = listener
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears it
        self.children: dict[int, socket.socket] = {}  # a worker's pid -> its engine's connection
        self.preloaded: tuple[bool, str | None] | None = None

    def sockets(self) -> list[socket.socket]:
        """Every socket this zygote holds: the listener, if any, and each engine's connection."""
        return [*([self.listener] if self.listener is not None else []), *self.conns]

    def serve(self) -> None:
        while self.conns or self.listener is not None:
            ready, _, _ = select.select([self.wake_r, *self.sockets()], [], [])
            if self.wake_r in ready:
                os.read(self.wake_r, 512)
            self._reap()
            if self.listener is not None and self.listener in ready:
                with contextlib.suppress(OSError):
                    self.conns.append(self.listener.accept()[0])
            for conn in [c for c in ready if c in self.conns]:
                if not self._handle(conn):
                    self._drop(conn)

    def _handle(self, conn: socket.socket) -> bool:
        """One request; False when its engine has gone (its end of the socket closed)."""
        try:
            data, fds, _, _ = socket.recv_fds(conn, RECORD, 2)
        except InterruptedError:
            return True
        except OSError:
            return False
        if not data:
            return False
        try:
            request = json.loads(data)
            if request.get("op") == "preload":
                return self._send(conn, self._preload())
            if request.get("op") == "ready":  # answered once serving: a shared zygote preloads first
                return self._send(conn, {"ready": True})
            if request.get("op") == "spawn" and len(fds) == 2:
                mismatch = self._mismatch(request)
                return self._send(conn, {"error": mismatch} if mismatch else {"pid": self._fork(conn, request, *fds)})
            return self._send(conn, {"error": f"bad request {request!r}"})
        finally:
            for fd in fds:
                os.close(fd)

    def _preload(self) -> dict:
        if self.preloaded is None:
            self.preloaded = preload()
        ok, why = self.preloaded
        return {"preloaded": ok, "why": why}

    def _mismatch(self, request: dict) -> str | None:
        """Why this zygote cannot fork a worker for that engine (a shared one: another Python,
        code or module path than it preloaded), or None."""
        if self.listener is None:
            return None
        if self.preloaded is not None and not self.preloaded[0]:  # forks from here would be unsafe
            return f"it did not preload safely: {self.preloaded[1]}"
        theirs, ours = request.get("identity"), identity()
        return None if theirs is None or theirs == ours else f"it serves {ours}, not {theirs}"

    def _drop(self, conn: socket.socket) -> None:
        """An engine has gone: so do the workers it asked for."""
        self.conns.remove(conn)
        conn.close()
        for pid in [pid for pid, owner in self.children.items() if owner is conn]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _fork(self, conn: socket.socket, request: dict, stdin_fd: int, stdout_fd: int) -> int:
        pid = os.fork()
        if pid:
            self.children[pid] = conn
            return pid
        code = 1
        try:
            self._become_worker(request, stdin_fd, stdout_fd)
            from engine.worker import main as worker

            code = worker.main(["--home", request["home"]])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - the worker's own crash: say it where its log is
            traceback.print_exc()
        finally:
            os._exit(code)

    def _become_worker(self, request: dict, stdin_fd: int, stdout_fd: int) -> None:
        """In the child: drop the zygote's state and take the worker's pipes, environment and folder."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        for sock in self.sockets():
            sock.close()
        os.dup2(stdin_fd, 0)
        os.dup2(stdout_fd, 1)
        os.close(stdin_fd)
        os.close(stdout_fd)
        sys.stdin = open(0, closefd=False)  # fd 0 is the worker's own stdin now
        set_name(b"tistudio-worker")
        os.environ.clear()
        os.environ.update(request["env"])
        # The worker dies with its parent, which is this zygote now (the zygote dies with the engine,
        # or, shared, kills the workers of an engine whose connection closes).
        os.environ["TISTUDIO_ENGINE_PID"] = str(os.getppid())
        os.chdir(request["home"])
        random.seed()  # not the zygote's sequence: every worker seeds what it needs anyway
        torch = sys.modules.get("torch")
        threads = request["env"].get("OMP_NUM_THREADS", "")
        if torch is not None and threads.isdigit():
            torch.set_num_threads(int(threads))  # OpenMP read its variable when the zygote loaded it

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            owner = self.children.pop(pid, None)
            if owner is not None and owner in self.conns:
                self._send(owner, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def _send(self, conn: socket.socket, message: dict) -> bool:
        """False when the engine is gone."""
        try:
            conn.send(json.dumps(message).encode())
            return True
        except OSError:
            return False


# -- the engine's side ---------------------------------------------------------------------------

PRELOAD_TIMEOUT = 180.0  # seconds for the zygote to import torch & co. (a slow disk, a busy box)
SPAWN_TIMEOUT = 10.0  # seconds for a fork to be answered
MAX_DEATHS = 3  # a zygote that keeps dying is not restarted again


def wants_warm(kind: str) -> bool:
    """Whether a job of `kind` needs torch, and so a worker forked after the preload: the engine's
    own kinds do; a kind added by $TISTUDIO_EXTRA_HANDLERS may not (the engine's tests')."""
    from engine.worker.job_kinds import HANDLERS  # torch-free: handlers import what they use when they run

    return kind in HANDLERS


class ForkedProcess:
    """A worker forked by the zygote, with what the supervisor uses of an asyncio Process:
    pid, stdin, stdout, wait() and kill()."""

    def __init__(self, pid: int, stdin: asyncio.StreamWriter, stdout: asyncio.StreamReader,
                 exited: asyncio.Future):
        self.pid, self.stdin, self.stdout = pid, stdin, stdout
        self._exited = exited

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int | None:
        """Its exit code (negative: the signal), or None when the zygote died first and took it along."""
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        if not self._exited.done():  # never a recycled pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class WarmSpawner:
    """Starts the zygote on first use and forks workers through it.  `spawn` answers None whenever
    a worker must be started the plain way instead (forking is off here, or the zygote would not
    start or preload safely)."""

    def __init__(self, home: os.PathLike | str, stream_limit: int):
        self.home = str(home)
        self.stream_limit = stream_limit
        self.broken: str | None = disabled_because()  # why the engine does not fork (here, or any more)
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._reader: asyncio.Task | None = None
        self._replies: collections.deque[asyncio.Future] = collections.deque()
        self._exits: dict[int, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._preloaded = False
        self._deaths = 0
        self._shared_pid: int | None = None  # the zygote serving the box, when SHARED_ENV names one

    async def spawn(self, env: dict[str, str], *, warm: bool) -> ForkedProcess | None:
        """A worker running `engine.worker.main` with `env`, forked after the preload when `warm`."""
        async with self._lock:  # one at a time, the giving up included: a spawn waiting here sees it
            if self.broken:
                return None
            try:
                if self._sock is None:
                    await self._start()
                if warm and not self._preloaded:
                    reply = await self._request({"op": "preload"}, timeout=PRELOAD_TIMEOUT)
                    if not reply.get("preloaded"):
                        raise ZygoteError(reply.get("why") or "it could not preload")
                    self._preloaded = True
                return await self._fork(env)
            except (ZygoteError, OSError, asyncio.TimeoutError, ValueError) as exc:
                await self._give_up(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ZygoteError) else str(exc))
                return None

    def describe(self) -> dict:
        """For `engine status`: the zygote's pid (None until the first worker), whether it has
        preloaded, and why the engine does not fork, if it does not."""
        pid = self._proc.pid if self._proc is not None else self._shared_pid
        return {"zygote": pid if self._sock is not None else None, "preloaded": self._preloaded, "off": self.broken}

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the zygote reads EOF and exits (a shared one kills our workers)
            self._sock = None
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), 3.0)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
            self._proc = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._fail_waiters()

    # -- inside

    async def _start(self) -> None:
        shared = os.environ.get(SHARED_ENV)
        if shared:
            await self._connect(shared)
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.server.zygote", "--home", self.home, "--fd", str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL, cwd=self.home,
                env=dict(os.environ, TISTUDIO_ENGINE_PID=str(os.getpid())))
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._reader = asyncio.create_task(self._read(ours))
        log.info("zygote %d started", self._proc.pid)

    async def _connect(self, path: str) -> None:
        """Use the zygote serving this box at `path` (SHARED_ENV) instead of starting one."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:  # not blocking the engine's loop while the zygote's backlog is full
            await asyncio.get_running_loop().sock_connect(sock, path)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError as exc:
            sock.close()
            raise ZygoteError(f"no zygote answers at {SHARED_ENV}={path} ({exc.strerror or exc}); "
                              f"start one with `python -m engine.server.zygote --home DIR --listen {path}`") from None
        self._sock, self._shared_pid = sock, struct.unpack("3i", creds)[0]
        self._reader = asyncio.create_task(self._read(sock))
        # It preloads before it answers anyone: wait for that as a preload is waited for, not as a fork.
        await self._request({"op": "ready"}, timeout=PRELOAD_TIMEOUT)
        log.info("using the zygote %d at %s", self._shared_pid, path)

    async def _fork(self, env: dict[str, str]) -> ForkedProcess:
        loop = asyncio.get_running_loop()
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        try:
            reply = await self._request({"op": "spawn", "env": env, "home": self.home, "identity": identity(env)},
                                        fds=(stdin_r, stdout_w),
                                        timeout=SPAWN_TIMEOUT)
            if "pid" not in reply:
                raise ZygoteError(reply.get("error") or f"no pid in {reply!r}")
        except BaseException:
            os.close(stdin_w)
            os.close(stdout_r)
            raise
        finally:
            os.close(stdin_r)  # the worker has its own copies now
            os.close(stdout_w)
        pid = reply["pid"]
        reader = asyncio.StreamReader(limit=self.stream_limit)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(stdout_r, "rb", 0))
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                            os.fdopen(stdin_w, "wb", 0))
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        return ForkedProcess(pid, writer, reader, reply["exited"])

    async def _request(self, message: dict, *, fds: tuple[int, ...] = (), timeout: float) -> dict:
        reply = asyncio.get_running_loop().create_future()
        self._replies.append(reply)
        data = json.dumps(message).encode()
        if len(data) > RECORD:
            raise ZygoteError(f"a request of {len(data)} bytes (the environment is too large)")
        for _ in range(500):  # a few KB into an idle peer's socket: it fits at once, or very soon
            try:
                socket.send_fds(self._sock, [data], list(fds))
                break
            except BlockingIOError:
                await asyncio.sleep(0.01)
        else:
            raise ZygoteError("the zygote does not read its socket")
        return await asyncio.wait_for(reply, timeout)

    async def _read(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(sock, RECORD)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            if "exit" in message:
                exited = self._exits.pop(message["exit"], None)
                if exited is not None and not exited.done():
                    exited.set_result(message["code"])
                continue
            if "pid" in message:  # waitable before anyone can hear of its exit
                message["exited"] = self._exits[message["pid"]] = loop.create_future()
            reply = self._replies.popleft() if self._replies else None
            if reply is not None and not reply.done():  # else its caller gave up, and so did we
                reply.set_result(message)
        if self._sock is sock:  # not closed by us: it died
            self._sock, self._preloaded, self._deaths = None, False, self._deaths + 1
            self._fail_waiters()
            if self._deaths >= MAX_DEATHS:
                self.broken = f"died {self._deaths} times"
            log.warning("zygote exited; %s", "the next worker starts a new one" if not self.broken
                        else "workers start the plain way from now on")

    def _fail_waiters(self) -> None:
        for reply in self._replies:
            if not reply.done():
                reply.set_exception(ZygoteError("the zygote exited"))
        self._replies.clear()
        for exited in self._exits.values():
            if not exited.done():
                exited.set_result(None)
        self._exits.clear()

    async def _give_up(self, why: str) -> None:
        self.broken = why
        log.warning("workers start the plain way from now on: the zygote %s", why)
        await self.close()


class ZygoteError(Exception):
    """The zygote could not give a worker."""


def set_name(name: bytes) -> None:
    """What top and `ps -o comm` call this process (its command line stays the zygote's)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.server.zygote")
    parser.add_argument("--home", required=True, help="the engine's home (for ps, and the workers' folder)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--fd", type=int, help="this end of the engine's socket pair")
    which.add_argument("--listen", metavar="PATH",
                       help="serve every engine that connects to this Unix socket (theirs: TISTUDIO_ZYGOTE=PATH)")
    args = parser.parse_args(argv)
    from engine.worker.main import _die_with_parent

    _die_with_parent()
    set_name(b"tistudio-zygote")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine decides when we stop
    if args.fd is not None:
        Zygote(sock=socket.socket(fileno=args.fd)).serve()
        return 0
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(args.listen)
    listener.listen(64)  # an engine may connect at once: it is answered once the preload is done
    zygote = Zygote(listener=listener)
    zygote._preload()  # at once: a shared zygote is there to be warm when the first engine asks
    zygote.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
