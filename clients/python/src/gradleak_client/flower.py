"""Flower integration: audit, for a sampled fraction of rounds, the update a Flower client is
about to share, without changing what it shares.

Three ways in, one `FlowerAuditor` behind them (none imports flwr unless asked to):

- `AuditedNumPyClient(numpy_client, auditor)`: wraps a `flwr.client.NumPyClient`;
  `.to_client()` gives the Flower client to return from `client_fn`.
- `AuditedClient(client, auditor)`: wraps a low-level `flwr.client.Client` whose `fit` takes
  `FitIns` and returns `FitRes` (Flower's `Parameters` format: numpy arrays saved as bytes).
- `gradleak_mod(auditor)`: a Flower Mod for the Message API (``ClientApp(mods=[...])`` or
  ``@app.train(mods=[...])``); it reads the incoming global model (`"arrays"`), the reply's
  local model (`"arrays"`) and `"num-examples"` (`"metrics"`), as Flower's strategies send them.

For a sampled round, the auditor uploads the global model the client received, the client's
delta (new - received weights) with its lr, local epochs, batch size and sample count, and
optionally the batch it trained on (to score the reconstruction); runs an attack job; and
records the verdict of its thresholds in `auditor.records` (and a JSON-lines file). The audit
runs in a background thread by default, and its failures are recorded, never raised into
Flower: auditing must not stop training.

    >>> auditor = FlowerAuditor(Client(), arch="lenet", image_shape=(3, 32, 32),
    ...                         names=list(net.state_dict()), fraction=0.2, lr=0.05, batch_size=8)
    >>> def client_fn(context):
    ...     return AuditedNumPyClient(MyNumPyClient(net, data), auditor).to_client()
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gradleak_client import tensors
from gradleak_client._client import Client
from gradleak_client._exceptions import GradleakError
from gradleak_client.audit import Check, evaluate_job
from gradleak_client.policy import Threshold
from gradleak_client.types import Attack, Budget, Job, ModelUpload

log = logging.getLogger("gradleak_client.flower")

NDArrays = list[np.ndarray]
GroundTruthFn = Callable[[int, Mapping[str, Any]], tuple[Any, Any]]
Verdict = Literal["pending", "pass", "fail", "error", "unscored"]
DEFAULT_THRESHOLDS = (Threshold(metric="psnr", max=20.0),)
# Where Flower apps conventionally put the round and the client's hyper-parameters.
ROUND_KEYS = ("server-round", "server_round", "round")
TRAINING_KEYS: dict[str, tuple[str, ...]] = {
    "lr": ("lr", "learning-rate", "learning_rate"),
    "local_epochs": ("local-epochs", "local_epochs", "epochs"),
    "batch_size": ("batch-size", "batch_size"),
}


@dataclass
class AuditRecord:
    """The audit of one round's update: the job and the verdict of the thresholds."""

    round: int
    num_examples: int
    training: dict[str, Any]
    verdict: Verdict = "pending"
    job_id: str | None = None
    status: str | None = None
    metrics: dict[str, Any] | None = None
    checks: list[Check] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)


def _reason(error: Exception) -> str:
    """gradleak's errors speak for themselves; anything else is named by its type."""
    return str(error) if isinstance(error, GradleakError) else f"{type(error).__name__}: {error}"


def ndarrays_from_parameters(parameters: Any) -> NDArrays:
    """Decode Flower's `Parameters` (numpy arrays saved as .npy bytes, `tensor_type`
    "numpy.ndarray") without flwr; pickled arrays are refused."""
    tensor_type = getattr(parameters, "tensor_type", "numpy.ndarray")
    if tensor_type != "numpy.ndarray":
        raise tensors.TensorInputError(f"Flower parameters of type {tensor_type!r}; expected numpy.ndarray")
    return [np.load(io.BytesIO(blob), allow_pickle=False) for blob in parameters.tensors]


class FlowerAuditor:
    """Audits sampled rounds of one Flower client (see the module's docstring).

    `names` are the state_dict names of the arrays Flower passes (``list(net.state_dict())``);
    with the Message API they default to the ArrayRecord's keys. `fraction` of the rounds are
    audited, chosen by a hash of (seed, round), so a run is reproducible; `rounds` lists rounds
    to audit instead. `lr`, `local_epochs` and `batch_size` are the client's settings (a round's
    config values under the usual keys, e.g. "lr" or "local-epochs", take precedence).
    `ground_truth(round, config)` returns the images (N, C, H, W in [0, 1]) and labels the
    client trained on, to score the reconstruction; without it the verdict is "unscored".
    The model is a registered `arch`, or your own `model`: an ONNX file (each round's weights are
    written into its initializers), or with an embedded client an `nn.Module` or import path.
    The default attack is FedAvg unrolling when the training facts are known (knowledge level
    3), else Inverting Gradients. The default threshold is a worst-case PSNR of 20 dB.
    """

    def __init__(
        self,
        client: Client,
        *,
        arch: str | None = None,
        model: Any = None,
        image_shape: Sequence[int],
        num_classes: int = 10,
        knobs: Mapping[str, Any] | None = None,
        names: Sequence[str] | None = None,
        fraction: float = 0.1,
        rounds: Collection[int] | None = None,
        seed: int = 0,
        lr: float | None = None,
        local_epochs: int | None = None,
        batch_size: int | None = None,
        normalization: str = "cifar10",
        attack: Attack | Mapping[str, Any] | None = None,
        knowledge: int | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        thresholds: Sequence[Threshold | Mapping[str, Any]] = DEFAULT_THRESHOLDS,
        ground_truth: GroundTruthFn | None = None,
        background: bool = True,
        timeout: float | None = 3600.0,
        log_path: str | Path | None = None,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
        if (arch is None) == (model is None):
            raise ValueError(
                "give arch (a registered architecture) or model (your own), not both nor neither"
            )
        self.client = client
        self.model = model
        self.arch, self.image_shape, self.num_classes = arch, tuple(image_shape), num_classes
        self.knobs = dict(knobs or {})
        self.names = None if names is None else list(names)
        self.fraction, self.rounds, self.seed = fraction, None if rounds is None else set(rounds), seed
        self.defaults = {"lr": lr, "local_epochs": local_epochs, "batch_size": batch_size}
        self.normalization = normalization
        self.attack = None if attack is None else dict(attack)
        self.knowledge = knowledge
        self.budget = None if budget is None else dict(budget)
        self.thresholds = [t if isinstance(t, Threshold) else Threshold.model_validate(t) for t in thresholds]
        self.ground_truth = ground_truth
        self.timeout = timeout
        self.log_path = None if log_path is None else Path(log_path)
        self.records: list[AuditRecord] = []
        self._lock = threading.Lock()
        self._calls = 0
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradleak-audit") if background else None
        )
        self._pending: list[Future[AuditRecord]] = []

    # --- which rounds ---------------------------------------------------------------------

    def round_of(self, config: Mapping[str, Any]) -> int:
        """The server round from the config, else the count of fit calls so far (from 1)."""
        with self._lock:
            self._calls += 1
            calls = self._calls
        for key in ROUND_KEYS:
            value = config.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return int(value)
        return calls

    def should_audit(self, server_round: int) -> bool:
        if self.rounds is not None:
            return server_round in self.rounds
        digest = hashlib.sha256(f"{self.seed}:{server_round}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64 < self.fraction

    def training_facts(self, config: Mapping[str, Any], num_examples: int) -> dict[str, Any]:
        """What the client did this round: the config's values, else the auditor's."""
        facts: dict[str, Any] = {}
        for name, keys in TRAINING_KEYS.items():
            value = next((config[k] for k in keys if k in config), self.defaults[name])
            if value is not None:
                facts[name] = float(value) if name == "lr" else int(value)
        facts["num_samples"] = int(num_examples)
        if "local_epochs" in facts and "batch_size" in facts:
            steps = facts["local_epochs"] * math.ceil(num_examples / facts["batch_size"])
            facts["protocol"] = "fedsgd" if steps == 1 else "fedavg"
        return facts

    # --- auditing -------------------------------------------------------------------------

    def observe(
        self,
        before: Sequence[Any],
        after: Sequence[Any],
        num_examples: int,
        config: Mapping[str, Any],
        names: Sequence[str] | None = None,
    ) -> AuditRecord | None:
        """Called with what a client received and is about to send; audits it if its round is
        sampled. Returns the record (filled in later when the audit runs in the background)."""
        server_round = self.round_of(config)
        if not self.should_audit(server_round):
            return None
        record = AuditRecord(server_round, int(num_examples), self.training_facts(config, num_examples))
        try:
            keys = list(names) if names is not None else self.names
            if keys is None:
                raise tensors.TensorInputError(
                    "give the auditor the state_dict names of the arrays (names=...)"
                )
            # Copies: the audit may run after Flower has moved on with these arrays.
            received = tensors.name_arrays([np.array(a, copy=True) for a in before], keys)
            shared = tensors.name_arrays([np.array(a, copy=True) for a in after], keys)
            truth = None
            if self.ground_truth is not None:
                truth = tensors.ground_truth(*self.ground_truth(server_round, dict(config)))
        except Exception as e:  # a failed audit is recorded: it must never stop training
            log.warning("gradleak: round %d not audited: %s", server_round, e)
            self._finish(
                record, error=f"{type(e).__name__}: {e}" if not isinstance(e, GradleakError) else str(e)
            )
            return record
        with self._lock:
            self.records.append(record)
        if self._executor is None:
            return self._run(record, received, shared, truth)
        self._pending.append(self._executor.submit(self._run, record, received, shared, truth))
        return record

    def _job_settings(self, facts: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
        if self.attack is not None:
            return self.attack, self.knowledge
        if {"lr", "local_epochs", "batch_size"} <= facts.keys():
            return {"name": "fedavg_unroll"}, 3 if self.knowledge is None else self.knowledge
        return {"name": "inverting_gradients"}, self.knowledge

    def _upload_model(self, received: dict[str, np.ndarray]) -> ModelUpload:
        """The model the client received: a registered architecture's weights, your ONNX graph
        with this round's weights, or (embedded service) your module with them."""
        shape, classes = self.image_shape, self.num_classes
        if self.model is None:
            weights = tensors.to_safetensors(received)
            return self.client.models.upload(
                weights, arch=self.arch, image_shape=shape, num_classes=classes, knobs=self.knobs
            )
        if isinstance(self.model, str | Path) and str(self.model).endswith(".onnx"):
            from gradleak_client.prepare import onnx_with_weights

            graph = onnx_with_weights(Path(self.model).read_bytes(), received)
            return self.client.models.upload(graph, image_shape=shape, num_classes=classes)
        upload_module = getattr(self.client, "upload_module", None)
        if upload_module is None:
            raise ValueError(
                "a torch module or import path is audited by the embedded service "
                "(EmbeddedService().client()); a remote service takes the model as ONNX (model='model.onnx')"
            )
        weights = tensors.to_safetensors(received)
        return upload_module(self.model, image_shape=shape, num_classes=classes, weights=weights)  # type: ignore[no-any-return]

    def _run(
        self,
        record: AuditRecord,
        received: dict[str, np.ndarray],
        shared: dict[str, np.ndarray],
        truth: bytes | None,
    ) -> AuditRecord:
        try:
            model = self._upload_model(received)
            update = self.client.updates.upload(
                tensors.delta_from_states(received, shared),
                model_id=model.id,
                kind="delta",
                client=record.training,
                # the update covers every sample of the round (a server's batch limit may refuse it)
                num_images=record.num_examples,
                normalization=self.normalization,  # type: ignore[arg-type]
            )
            truth_id = None
            if truth is not None:
                truth_id = self.client.ground_truth.upload(truth).id
            attack, knowledge = self._job_settings(record.training)
            job = self.client.jobs.create(
                update_id=update.id,
                ground_truth_id=truth_id,
                attack=attack,
                knowledge=knowledge,
                budget=self.budget,
            )
            record.job_id = job.id
            job = self.client.jobs.wait(job.id, timeout=self.timeout)
        except Exception as e:  # a failed audit is recorded: it must never stop training
            log.warning("gradleak audit of round %d failed: %s", record.round, e)
            self._finish(record, error=_reason(e))
            return record
        self._finish(record, job=job)
        return record

    def _finish(self, record: AuditRecord, *, job: Job | None = None, error: str | None = None) -> None:
        if job is not None:
            record.status, record.metrics = job.status, job.metrics
            if job.status == "succeeded" and job.metrics is None:
                record.verdict = "unscored"
            else:
                record.checks = evaluate_job(job, self.thresholds, "as-shared", "round", gated=True)
                outcomes = {c.outcome for c in record.checks}
                record.verdict = "fail" if "fail" in outcomes else "error" if "error" in outcomes else "pass"
        else:
            record.verdict, record.error = "error", error
        with self._lock:
            if record not in self.records:
                self.records.append(record)
            if self.log_path is not None:
                with self.log_path.open("a", encoding="utf-8") as f:
                    f.write(record.to_json() + "\n")
        log.info("gradleak audit of round %d: %s", record.round, record.verdict)

    def flush(self, timeout: float | None = None) -> list[AuditRecord]:
        """Wait for the audits running in the background; return every record so far."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result(timeout)
        with self._lock:
            return list(self.records)

    def close(self) -> None:
        """Wait for running audits and stop the background thread."""
        self.flush()
        if self._executor is not None:
            self._executor.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# the three ways in
# ---------------------------------------------------------------------------------------------


class AuditedNumPyClient:
    """A Flower NumPyClient that behaves exactly like `client` and has its fit results audited."""

    def __init__(self, client: Any, auditor: FlowerAuditor) -> None:
        self.client, self.auditor = client, auditor

    def get_properties(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.client.get_properties(config))

    def get_parameters(self, config: Mapping[str, Any]) -> NDArrays:
        return list(self.client.get_parameters(config))

    def fit(self, parameters: NDArrays, config: Mapping[str, Any]) -> tuple[NDArrays, int, dict[str, Any]]:
        result = self.client.fit(parameters, config)
        new_parameters, num_examples, _ = result
        self.auditor.observe(parameters, new_parameters, num_examples, config)
        return result  # type: ignore[no-any-return]

    def evaluate(self, parameters: NDArrays, config: Mapping[str, Any]) -> tuple[float, int, dict[str, Any]]:
        return self.client.evaluate(parameters, config)  # type: ignore[no-any-return]

    def to_client(self) -> Any:
        """The `flwr.client.Client` to return from a `client_fn` (needs flwr)."""
        from flwr.client import NumPyClient

        wrapper = self

        class _Audited(NumPyClient):  # type: ignore[misc]
            def get_properties(self, config: Any) -> Any:
                return wrapper.get_properties(config)

            def get_parameters(self, config: Any) -> Any:
                return wrapper.get_parameters(config)

            def fit(self, parameters: Any, config: Any) -> Any:
                return wrapper.fit(parameters, config)

            def evaluate(self, parameters: Any, config: Any) -> Any:
                return wrapper.evaluate(parameters, config)

        return _Audited().to_client()


class AuditedClient:
    """A low-level Flower `Client` (fit(FitIns) -> FitRes) with its fit results audited; it
    returns exactly what `client` returns."""

    def __init__(self, client: Any, auditor: FlowerAuditor) -> None:
        self.client, self.auditor = client, auditor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def fit(self, ins: Any) -> Any:
        res = self.client.fit(ins)
        if _is_ok(res.status):
            before = ndarrays_from_parameters(ins.parameters)
            after = ndarrays_from_parameters(res.parameters)
            self.auditor.observe(before, after, res.num_examples, dict(ins.config))
        return res


def _is_ok(status: Any) -> bool:
    code = getattr(status, "code", None)
    return getattr(code, "name", code) in ("OK", 0)


def _arrays(record: Any) -> tuple[NDArrays, list[str]]:
    names = [str(k) for k in record]
    if hasattr(record, "to_numpy_ndarrays"):
        return list(record.to_numpy_ndarrays()), names
    return [np.asarray(record[k].numpy()) for k in record], names


def gradleak_mod(
    auditor: FlowerAuditor,
    *,
    arrays_key: str = "arrays",
    config_key: str = "config",
    metrics_key: str = "metrics",
    num_examples_key: str = "num-examples",
) -> Callable[[Any, Any, Callable[[Any, Any], Any]], Any]:
    """A Flower Mod that audits train replies (the keys are those of Flower's strategies).
    Names default to the ArrayRecord's keys (a torch state_dict's names when the app builds
    the record from one); the auditor's `names` take precedence."""

    def mod(msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        try:
            before, names = _arrays(msg.content[arrays_key])
            after, _ = _arrays(reply.content[arrays_key])
            config = dict(msg.content[config_key]) if config_key in msg.content else {}
            num_examples = int(reply.content[metrics_key][num_examples_key])
        except (KeyError, TypeError, ValueError) as e:
            log.warning("gradleak: cannot read the train message (%s); not audited", e)
            return reply
        auditor.observe(before, after, num_examples, config, names=auditor.names or names)
        return reply

    return mod
