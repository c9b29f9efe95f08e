"""The gradleak service inside this process, for CI runners without a remote service.

`EmbeddedService` builds the real API (the server package `gradleak`, imported only here and
only when started) with embedded settings in a temporary data directory, runs its lifespan so
that its job worker starts, and serves it on a private event-loop thread. Clients reach it
through httpx's ASGI transport, so the SDK, the CLI and the audit gate run the same code path
as against a remote service:

    >>> with EmbeddedService() as service, service.client() as client:
    ...     print(client.catalog.get().attacks[0]["name"])

Responses are delivered whole (the ASGI transport buffers them): `jobs.events()` then yields
its events when the job has finished; `jobs.wait()` polls and shows progress as it goes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx

from gradleak_client._client import AsyncClient, Client
from gradleak_client._exceptions import GradleakError
from gradleak_client._resources import _model_options
from gradleak_client.types import ModelUpload

EMBEDDED_URL = "http://gradleak.embedded"
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
STARTUP_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 60.0
Isolation = Literal["thread", "process"]
ASGIMessage = dict[str, Any]


class EmbeddedUnavailableError(GradleakError):
    """The server package is not installed, or the embedded service could not start."""


def _server_modules() -> tuple[Any, Any]:
    try:
        from api.app import create_app
        from service.settings import Settings
    except ImportError as e:
        raise EmbeddedUnavailableError(
            "running gradleak embedded needs the server package `gradleak` (with torch) in this "
            f"environment ({e}): pip install 'gradleak @ git+<the gradleak repository URL>', or "
            "a wheel built with `make dist`; or point the client at a running service "
            "with --url / GRADLEAK_URL"
        ) from None
    return create_app, Settings


class _Lifespan:
    """Runs an ASGI app's lifespan protocol: startup before the first request, shutdown at close."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self._to_app: asyncio.Queue[ASGIMessage] = asyncio.Queue()
        self._from_app: asyncio.Queue[ASGIMessage] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _next(self) -> ASGIMessage:
        assert self._task is not None
        getter = asyncio.ensure_future(self._from_app.get())
        done, _ = await asyncio.wait({getter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        error = self._task.exception()
        raise EmbeddedUnavailableError(f"the embedded service stopped during its lifespan: {error!r}")

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.ensure_future(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._next()
        if message["type"] != "lifespan.startup.complete":
            raise EmbeddedUnavailableError(
                f"the embedded service did not start: {message.get('message', '')}"
            )

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._next()
        await self._task


class EmbeddedService:
    """The gradleak API and its worker in this process (see the module's docstring).

    `data_dir`: where job state and artifacts go (default: a temporary directory, deleted at
    close). `isolation`: "thread" runs jobs in a thread of this process; "process" in a worker
    process, as `gradleak serve` does. `torch_threads` caps torch's CPU threads while the
    service runs (thread isolation). `settings` overrides other server settings (e.g.
    ``{"device": "cuda"}``); GRADLEAK_* environment variables apply as for `gradleak serve`,
    except that the queue, state and artifacts are always local.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        isolation: Isolation = "thread",
        torch_threads: int | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self._data_dir = None if data_dir is None else Path(data_dir)
        self.isolation = isolation
        self.torch_threads = torch_threads
        self._overrides = dict(settings or {})
        self._temp: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lifespan: _Lifespan | None = None
        self._asgi: httpx.ASGITransport | None = None
        self._saved_threads: int | None = None
        self._modules: dict[str | int, tuple[str, Any]] = {}

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("the embedded service has not been started")
        return self._data_dir

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> EmbeddedService:
        """Build the API and start it (its worker included); refused if already started."""
        if self._thread is not None:
            raise RuntimeError("the embedded service is already running")
        create_app, settings_cls = _server_modules()
        if self._data_dir is None:
            self._temp = tempfile.mkdtemp(prefix="gradleak-embedded-")
            self._data_dir = Path(self._temp)
        try:
            settings = settings_cls(
                **{
                    **self._overrides,
                    "data_dir": self._data_dir,
                    "redis_url": None,
                    "s3_endpoint": None,
                    "host": "127.0.0.1",
                    "auth_required": False,
                }
            )
            if self.torch_threads is not None:
                import torch

                self._saved_threads = torch.get_num_threads()
                torch.set_num_threads(self.torch_threads)
            app = create_app(settings, queue_factory=self._queue_factory())
            ready = threading.Event()
            self._thread = threading.Thread(
                target=self._run_loop, args=(ready,), name="gradleak-embedded", daemon=True
            )
            self._thread.start()
            ready.wait()
            self._submit(self._startup(app), STARTUP_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        return self

    def _queue_factory(self) -> Callable[..., Any] | None:
        if self.isolation == "process":
            return None  # the settings' default: the embedded queue with its worker process

        def thread_queue(settings: Any, state: Any, store: Any) -> Any:
            from service.jobs.embedded import EmbeddedQueue
            from service.jobs.runner import run_job

            return EmbeddedQueue(settings, state, store, isolation="thread", runner=run_job)

        return thread_queue

    def _run_loop(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        loop.call_soon(ready.set)
        loop.run_forever()

    async def _startup(self, app: Any) -> None:
        self._lifespan = _Lifespan(app)
        await self._lifespan.startup()
        self._asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=("127.0.0.1", 0))

    def close(self) -> None:
        """Stop the worker and the API (a running job is interrupted), and delete a temporary
        data directory."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            if self._lifespan is not None:
                try:
                    self._submit(self._lifespan.shutdown(), SHUTDOWN_TIMEOUT_S)
                finally:
                    self._lifespan = None
            loop.call_soon_threadsafe(loop.stop)
            thread.join(SHUTDOWN_TIMEOUT_S)
            if not thread.is_alive():
                loop.close()
        self._loop = self._thread = None
        self._asgi = None
        if self._modules:
            from service.models.local import unregister_module

            for key, _ in self._modules.values():
                unregister_module(key)
            self._modules.clear()
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
            self._data_dir = None

    def __enter__(self) -> EmbeddedService:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- requests -------------------------------------------------------------------------

    def _submit(self, coro: Any, timeout: float | None) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the embedded service is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _future(self, request: httpx.Request, body: bytes) -> concurrent.futures.Future[httpx.Response]:
        if self._loop is None or self._asgi is None:
            raise httpx.ConnectError("the embedded gradleak service is not running", request=request)
        return asyncio.run_coroutine_threadsafe(self._handle(request, body), self._loop)

    async def _handle(self, request: httpx.Request, body: bytes) -> httpx.Response:
        assert self._asgi is not None
        inner = httpx.Request(request.method, request.url, headers=request.headers, content=body)
        response = await self._asgi.handle_async_request(inner)
        content = await response.aread()
        return httpx.Response(response.status_code, headers=response.headers.raw, content=content)

    def transport(self) -> httpx.BaseTransport:
        """A transport for `httpx.Client` (and so for `Client`) that reaches this service."""
        return _SyncBridge(self)

    def async_transport(self) -> httpx.AsyncBaseTransport:
        """A transport for `httpx.AsyncClient` (and `AsyncClient`), from any event loop."""
        return _AsyncBridge(self)

    def client(self, **kwargs: Any) -> EmbeddedClient:
        """A `Client` of this service that also takes your own torch modules (see
        `EmbeddedClient`); keyword arguments go to `Client`."""
        return EmbeddedClient(self, base_url=EMBEDDED_URL, api_key="", transport=self.transport(), **kwargs)

    # --- the user's own torch modules ------------------------------------------------------

    def register_model(self, model: Any) -> str:
        """Keep a torch module (or the one an import path `package.module:factory` makes) for this
        service's jobs; return the key that `ModelSpec(arch="module", source=key)` names it by.
        Jobs run on a copy. Needs thread isolation: a worker process would not see it."""
        if self.isolation != "thread":
            raise EmbeddedUnavailableError(
                "torch modules are handed to jobs in this process: start the embedded service with "
                "isolation='thread', or export the model to ONNX (gradleak_client.prepare.export_onnx)"
            )
        from service.models.local import import_factory, register_module

        # one key per module for the service's life: a Flower run hands the same module every round
        ident = model if isinstance(model, str) else id(model)
        if ident not in self._modules:
            module = import_factory(model) if isinstance(model, str) else model
            self._modules[ident] = (register_module(module), module)
        return self._modules[ident][0]

    def async_client(self, **kwargs: Any) -> AsyncClient:
        """An `AsyncClient` of this service."""
        return AsyncClient(base_url=EMBEDDED_URL, api_key="", transport=self.async_transport(), **kwargs)


def is_module(model: Any) -> bool:
    """A torch nn.Module, told without importing torch (a client without torch has none)."""
    return any(
        f"{cls.__module__}.{cls.__qualname__}" == "torch.nn.modules.module.Module"
        for cls in type(model).__mro__
    )


def is_import_path(model: Any) -> bool:
    return isinstance(model, str) and bool(_IMPORT_PATH.match(model)) and not Path(model).exists()


class EmbeddedClient(Client):
    """A `Client` of an `EmbeddedService`. Besides files, `audit(model=...)` and
    `upload_module` take your own model as a torch `nn.Module` or an import path
    `package.module:factory`: it stays in this process (it is your code; nothing of it goes over
    HTTP), and its update's tensors are named like its `named_parameters()`.

        >>> with EmbeddedService() as service, service.client() as client:
        ...     job = client.audit(model=my_cnn, update="u.safetensors", image_shape=(3, 32, 32),
        ...                        ground_truth="b.safetensors")
    """

    def __init__(self, service: EmbeddedService, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._service = service

    def upload_module(
        self, model: Any, *, image_shape: Sequence[int], num_classes: int = 10, weights: bytes | None = None
    ) -> ModelUpload:
        """Register a torch module (or an import path's) with the embedded service and upload the
        model the server sent: `weights` (safetensors of its state_dict), else the module's own."""
        from service.models.local import local_module
        from service.tensorio import save_safetensors

        key = self._service.register_model(model)
        if weights is None:
            weights = save_safetensors(local_module(key).state_dict())
        options = _model_options(weights, "module", image_shape, num_classes, None, None, source=key)
        return self._call(options, ModelUpload)

    def _upload_model(
        self,
        model: Any,
        arch: str | None,
        image_shape: Sequence[int],
        num_classes: int,
        knobs: Mapping[str, Any] | None,
    ) -> ModelUpload:
        if is_module(model) or is_import_path(model):
            if arch is not None or knobs:
                raise EmbeddedUnavailableError(
                    "a torch module is its own architecture: leave out arch and knobs"
                )
            return self.upload_module(model, image_shape=image_shape, num_classes=num_classes)
        return super()._upload_model(model, arch, image_shape, num_classes, knobs)


def _read_timeout(request: httpx.Request) -> float | None:
    timeouts = request.extensions.get("timeout") or {}
    value = timeouts.get("read")
    return None if value is None else float(value)


def _rebuild(response: httpx.Response, request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        response.status_code,
        headers=response.headers.raw,
        stream=httpx.ByteStream(response.content),
        request=request,
    )


class _SyncBridge(httpx.BaseTransport):
    def __init__(self, service: EmbeddedService) -> None:
        self.service = service

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        future = self.service._future(request, request.read())
        try:
            response = future.result(_read_timeout(request))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise httpx.ReadTimeout("the embedded service did not answer in time", request=request) from None
        return _rebuild(response, request)


class _AsyncBridge(httpx.AsyncBaseTransport):
    def __init__(self, service: EmbeddedService) -> None:
        self.service = service

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        future = self.service._future(request, await request.aread())
        try:
            response = await asyncio.wait_for(asyncio.wrap_future(future), _read_timeout(request))
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout("the embedded service did not answer in time", request=request) from None
        return _rebuild(response, request)
