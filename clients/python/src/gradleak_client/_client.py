"""`Client` and `AsyncClient`: one configuration and retry policy (`_base.py`), two ways to wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from types import TracebackType
from typing import Any, overload

import httpx

from gradleak_client._base import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    RETRYABLE_ERRORS,
    BaseClient,
    M,
    RequestOptions,
    Timeout,
    is_retryable_status,
    new_request_id,
)
from gradleak_client._resources import (
    Artifacts,
    AsyncArtifacts,
    AsyncCatalogResource,
    AsyncFederations,
    AsyncGenerators,
    AsyncGeneratorTrainings,
    AsyncGroundTruth,
    AsyncJobs,
    AsyncModels,
    AsyncStudies,
    AsyncUpdates,
    CatalogResource,
    Federations,
    FileInput,
    Generators,
    GeneratorTrainings,
    GroundTruth,
    Jobs,
    Models,
    Progress,
    Studies,
    Updates,
)
from gradleak_client.types import (
    Attack,
    Budget,
    ClientTraining,
    Defense,
    Job,
    ModelUpload,
    Normalization,
    UpdateKind,
)


class Client(BaseClient):
    """The gradleak API, synchronously.

    `base_url` defaults to $GRADLEAK_URL (else http://127.0.0.1:8731, where `gradleak serve`
    listens) and `api_key` to $GRADLEAK_API_KEY (a local server on 127.0.0.1 needs none).
    `transport` or `http_client` replace the HTTP layer (a proxy, custom TLS, tests).

    >>> from gradleak_client import Client
    >>> with Client() as client:
    ...     job = client.audit(model="lenet.safetensors", update="grad.safetensors",
    ...                        ground_truth="batch.safetensors", arch="lenet", image_shape=(3, 32, 32))
    >>> job.scores.worst_case["psnr"]
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(transport=transport, timeout=timeout)
        self.models = Models(self)
        self.updates = Updates(self)
        self.ground_truth = GroundTruth(self)
        self.generators = Generators(self)
        self.jobs = Jobs(self)
        self.federations = Federations(self)
        self.generator_trainings = GeneratorTrainings(self)
        self.studies = Studies(self)
        self.artifacts = Artifacts(self)
        self.catalog = CatalogResource(self)

    # --- plumbing -------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _send(self, options: RequestOptions) -> httpx.Response:
        key = self._idempotency_key(options)
        retries = 0
        while True:
            request_id = new_request_id()
            request = self._build_request(self._http, options, request_id, key)
            try:
                response = self._http.send(
                    request, stream=options.stream, follow_redirects=options.follow_redirects
                )
            except RETRYABLE_ERRORS as e:
                delay = self._retry_delay(retries, None)
                if delay is None:
                    raise self._connection_error(e, options, request_id) from e
                retries += 1
                self._log_retry(options, delay, type(e).__name__, retries)
                self._sleep(delay)
                continue
            except httpx.HTTPError as e:
                raise self._connection_error(e, options, request_id) from e
            if not response.is_error:
                return response
            if is_retryable_status(response.status_code):
                delay = self._retry_delay(retries, response)
                if delay is not None:
                    response.close()
                    retries += 1
                    self._log_retry(options, delay, f"HTTP {response.status_code}", retries)
                    self._sleep(delay)
                    continue
            try:
                response.read()
            finally:
                response.close()
            raise self._status_error(response)

    @overload
    def _call(self, options: RequestOptions, cast_to: type[M]) -> M: ...

    @overload
    def _call(self, options: RequestOptions, cast_to: None) -> None: ...

    def _call(self, options: RequestOptions, cast_to: type[M] | None) -> M | None:
        response = self._send(options)
        return None if cast_to is None else self._parse(response, cast_to)

    @contextmanager
    def _stream(self, options: RequestOptions) -> Iterator[httpx.Response]:
        response = self._send(replace(options, stream=True))
        try:
            yield response
        finally:
            response.close()

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections (only those of an HTTP client this client made itself)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the whole audit in one call --------------------------------------------------------

    def _upload_model(
        self,
        model: Any,
        arch: str | None,
        image_shape: Sequence[int],
        num_classes: int,
        knobs: Mapping[str, Any] | None,
    ) -> ModelUpload:
        # A remote service takes files; the embedded client also takes torch modules.
        return self.models.upload(
            model, arch=arch, image_shape=image_shape, num_classes=num_classes, knobs=knobs
        )

    def audit(
        self,
        *,
        model: FileInput,
        update: FileInput,
        arch: str | None = None,
        image_shape: Sequence[int],
        num_classes: int = 10,
        knobs: Mapping[str, Any] | None = None,
        kind: UpdateKind = "gradient",
        client: ClientTraining | Mapping[str, Any] | None = None,
        normalization: Normalization | Mapping[str, Sequence[float]] = "cifar10",
        num_images: int | None = None,
        labels: Sequence[int] | None = None,
        ground_truth: FileInput | None = None,
        attack: Attack | Mapping[str, Any] | None = None,
        knowledge: int | None = None,
        defenses: Sequence[Defense | Mapping[str, Any]] | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        seed: int | None = None,
        timeout: float | None = None,
        progress: Progress = False,
    ) -> Job:
        """Upload the model, the update and (to score the result) the client's images, run one
        attack job and wait for it. Returns the finished job; `job.scores` has the metrics.
        `model` holds the weights of the registered architecture `arch`, or, without `arch`, is
        your own model as ONNX (`gradleak_client.prepare` writes all three files).

        >>> job = client.audit(model="lenet.safetensors", update="grad.safetensors", arch="lenet",
        ...                    image_shape=(3, 32, 32), ground_truth="batch.safetensors",
        ...                    attack={"name": "dlg"}, budget={"iterations": 300}, progress=True)
        >>> job.raise_for_status().scores.worst_case["psnr"]
        """
        uploaded_model = self._upload_model(model, arch, image_shape, num_classes, knobs)
        uploaded_update = self.updates.upload(
            update,
            model_id=uploaded_model.id,
            kind=kind,
            client=client,
            normalization=normalization,
            num_images=num_images,
            labels=labels,
        )
        truth = None if ground_truth is None else self.ground_truth.upload(ground_truth)
        job = self.jobs.create(
            update_id=uploaded_update.id,
            ground_truth_id=None if truth is None else truth.id,
            attack=attack,
            knowledge=knowledge,
            defenses=defenses,
            budget=budget,
            seed=seed,
        )
        return self.jobs.wait(job.id, timeout=timeout, progress=progress)


class AsyncClient(BaseClient):
    """The gradleak API for asyncio code; the same resources and methods as `Client`, awaited.

    >>> async with AsyncClient() as client:
    ...     job = await client.jobs.create(update_id="upd_...", attack={"name": "dlg"})
    ...     async for event in client.jobs.events(job.id):
    ...         print(event.job.progress)
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(transport=transport, timeout=timeout)
        self.models = AsyncModels(self)
        self.updates = AsyncUpdates(self)
        self.ground_truth = AsyncGroundTruth(self)
        self.generators = AsyncGenerators(self)
        self.jobs = AsyncJobs(self)
        self.federations = AsyncFederations(self)
        self.generator_trainings = AsyncGeneratorTrainings(self)
        self.studies = AsyncStudies(self)
        self.artifacts = AsyncArtifacts(self)
        self.catalog = AsyncCatalogResource(self)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _send(self, options: RequestOptions) -> httpx.Response:
        key = self._idempotency_key(options)
        retries = 0
        while True:
            request_id = new_request_id()
            request = self._build_request(self._http, options, request_id, key)
            try:
                response = await self._http.send(
                    request, stream=options.stream, follow_redirects=options.follow_redirects
                )
            except RETRYABLE_ERRORS as e:
                delay = self._retry_delay(retries, None)
                if delay is None:
                    raise self._connection_error(e, options, request_id) from e
                retries += 1
                self._log_retry(options, delay, type(e).__name__, retries)
                await self._sleep(delay)
                continue
            except httpx.HTTPError as e:
                raise self._connection_error(e, options, request_id) from e
            if not response.is_error:
                return response
            if is_retryable_status(response.status_code):
                delay = self._retry_delay(retries, response)
                if delay is not None:
                    await response.aclose()
                    retries += 1
                    self._log_retry(options, delay, f"HTTP {response.status_code}", retries)
                    await self._sleep(delay)
                    continue
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise self._status_error(response)

    @overload
    async def _call(self, options: RequestOptions, cast_to: type[M]) -> M: ...

    @overload
    async def _call(self, options: RequestOptions, cast_to: None) -> None: ...

    async def _call(self, options: RequestOptions, cast_to: type[M] | None) -> M | None:
        response = await self._send(options)
        return None if cast_to is None else self._parse(response, cast_to)

    @asynccontextmanager
    async def _stream(self, options: RequestOptions) -> AsyncIterator[httpx.Response]:
        response = await self._send(replace(options, stream=True))
        try:
            yield response
        finally:
            await response.aclose()

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def audit(
        self,
        *,
        model: FileInput,
        update: FileInput,
        arch: str | None = None,
        image_shape: Sequence[int],
        num_classes: int = 10,
        knobs: Mapping[str, Any] | None = None,
        kind: UpdateKind = "gradient",
        client: ClientTraining | Mapping[str, Any] | None = None,
        normalization: Normalization | Mapping[str, Sequence[float]] = "cifar10",
        num_images: int | None = None,
        labels: Sequence[int] | None = None,
        ground_truth: FileInput | None = None,
        attack: Attack | Mapping[str, Any] | None = None,
        knowledge: int | None = None,
        defenses: Sequence[Defense | Mapping[str, Any]] | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        seed: int | None = None,
        timeout: float | None = None,
        progress: Progress = False,
    ) -> Job:
        """See `Client.audit`."""
        uploaded_model = await self.models.upload(
            model, arch=arch, image_shape=image_shape, num_classes=num_classes, knobs=knobs
        )
        uploaded_update = await self.updates.upload(
            update,
            model_id=uploaded_model.id,
            kind=kind,
            client=client,
            normalization=normalization,
            num_images=num_images,
            labels=labels,
        )
        truth = None if ground_truth is None else await self.ground_truth.upload(ground_truth)
        job = await self.jobs.create(
            update_id=uploaded_update.id,
            ground_truth_id=None if truth is None else truth.id,
            attack=attack,
            knowledge=knowledge,
            defenses=defenses,
            budget=budget,
            seed=seed,
        )
        return await self.jobs.wait(job.id, timeout=timeout, progress=progress)
