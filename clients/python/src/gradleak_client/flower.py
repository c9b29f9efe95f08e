"""Flower integration: audit a sampled fraction of the updates a Flower federation exchanges,
without changing them, on the client side, on the server side, or both.

One `FlowerAuditor` behind every way in (none imports flwr unless asked to):

- `AuditedStrategy(strategy, auditor)`: wraps a Message-API strategy (``flwr.serverapp.strategy``,
  e.g. `FedAvg`) in the ServerApp: it audits a sampled fraction of the train replies the server
  aggregates, each against the global model it sent that node, with the facts the node declared
  (its reply's metrics, else the round's config). It aggregates exactly what the strategy would.
- `gradleak_mod(auditor)`: a ClientApp Mod (``ClientApp(mods=[...])``): it audits the node's own
  train replies (the received `"arrays"` against the reply's).
- `AuditedNumPyClient` / `AuditedClient`: the legacy NumPyClient / Client (FitIns/FitRes) APIs.

An audit is handed to the gradleak service: the auditor uploads the global model, the delta
(new - received weights) with the client's lr, local epochs, batch size and sample count (and,
if given, the batch it trained on, to score the reconstruction), creates the job and returns;
nothing depends on the Flower process living on (Flower runs each message in a fresh ClientApp
process that exits soon after replying). Every sampled audit is written to `log_path` (JSON lines)
when submitted and again when it fails or finishes, and logged; `auditor.collect()` (in any later
process, from the same `log_path`) waits for the submitted jobs and records their verdicts.
Failures are recorded, never raised into Flower: auditing must not stop training.

    >>> auditor = FlowerAuditor(Client(), arch="lenet", image_shape=(3, 32, 32), fraction=0.2,
    ...                         log_path="audits.jsonl")
    >>> app = ClientApp(mods=[gradleak_mod(auditor)])                 # client side
    >>> strategy = AuditedStrategy(FedAvg(), auditor)                  # server side
    >>> [r.verdict for r in auditor.collect()]                         # later, anywhere
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeGuard

import numpy as np

from gradleak_client import tensors
from gradleak_client._client import Client
from gradleak_client._exceptions import GradleakError
from gradleak_client.audit import evaluate_job
from gradleak_client.policy import Threshold
from gradleak_client.types import Attack, Budget, Job, ModelUpload

log = logging.getLogger("gradleak_client.flower")

NDArrays = list[np.ndarray]
GroundTruthFn = Callable[[int, Mapping[str, Any]], tuple[Any, Any]]
Verdict = Literal["pending", "pass", "fail", "error", "unscored"]
Side = Literal["client", "server"]
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
    """The audit of one update: where it came from, the job and the verdict of the thresholds."""

    round: int
    num_examples: int
    training: dict[str, Any]
    side: Side = "client"
    node_id: int | None = None
    verdict: Verdict = "pending"
    job_id: str | None = None
    status: str | None = None
    metrics: dict[str, Any] | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_json(cls, line: str) -> AuditRecord:
        data = json.loads(line)
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}})


def read_records(path: str | Path) -> list[AuditRecord]:
    """The audits in a JSON-lines record file, each in its latest state, in submission order."""
    latest: dict[str, AuditRecord] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = AuditRecord.from_json(line)
            latest[record.id] = record
    return list(latest.values())


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


def _scalar(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def describe(record: AuditRecord, what: str) -> str:
    node = "" if record.node_id is None else f" of node {record.node_id}"
    return f"{record.side}-side audit of round {record.round}{node}: {what}"


class AuditLog:
    """The audits' record: each state of each audit appended to `path` (JSON lines), when given,
    and the verdicts of their jobs against `thresholds` once they end."""

    def __init__(
        self,
        client: Client,
        *,
        thresholds: Sequence[Threshold | Mapping[str, Any]] = DEFAULT_THRESHOLDS,
        path: str | Path | None = None,
        timeout: float | None = 3600.0,
    ) -> None:
        self.client = client
        self.thresholds = [t if isinstance(t, Threshold) else Threshold.model_validate(t) for t in thresholds]
        self.path = None if path is None else Path(path)
        self.timeout = timeout
        self.records: list[AuditRecord] = []
        self._lock = threading.Lock()

    def add(self, record: AuditRecord) -> None:
        with self._lock:
            self.records.append(record)

    def write(self, record: AuditRecord) -> None:
        """Append the record's state as one line; O_APPEND keeps the lines of the processes
        that share the file (one per ClientApp message) whole."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (record.to_json() + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def finish(self, record: AuditRecord, *, job: Job | None = None, error: str | None = None) -> None:
        """Record how an audit ended: its job's verdict, or the error that stopped it."""
        if job is not None:
            record.status, record.metrics = job.status, job.metrics
            if job.status == "succeeded" and job.metrics is None and job.verdict is None:
                record.verdict = "unscored"  # neither the client's images nor a leakage estimate
            else:
                checks = evaluate_job(job, self.thresholds, "as-shared", "round", gated=True)
                record.checks = [dataclasses.asdict(c) for c in checks]
                outcomes = {c.outcome for c in checks}
                record.verdict = "fail" if "fail" in outcomes else "error" if "error" in outcomes else "pass"
        else:
            record.verdict, record.error = "error", error
        self.write(record)
        log.info("gradleak: %s", describe(record, record.verdict))

    def resolve(self, record: AuditRecord, timeout: float | None = None) -> None:
        """Wait for a submitted audit's job and record its verdict (errors are recorded too)."""
        assert record.job_id is not None
        try:
            job = self.client.jobs.wait(record.job_id, timeout=self.timeout if timeout is None else timeout)
        except Exception as e:  # recorded, never raised: auditing must not stop training
            log.warning("gradleak: %s", describe(record, f"job {record.job_id}: {_reason(e)}"))
            self.finish(record, error=_reason(e))
            return
        self.finish(record, job=job)

    def collect(self, timeout: float | None = None, recheck: bool = False) -> list[AuditRecord]:
        """Wait for every submitted audit, this process's and those in `path` (written by
        processes that have exited, such as Flower's ClientApp processes), record their
        verdicts, and return every audit. `recheck` judges the audits that already have a
        verdict again, against this log's thresholds."""
        with self._lock:
            records = {r.id: r for r in self.records}
        if self.path is not None and self.path.exists():
            for record in read_records(self.path):
                records.setdefault(record.id, record)
        for record in records.values():
            if record.job_id is not None and (record.verdict == "pending" or (recheck and record.status)):
                self.resolve(record, timeout)
        with self._lock:
            self.records = list(records.values())
            return list(self.records)


class FlowerAuditor:
    """Audits sampled updates of a Flower federation (see the module's docstring).

    `names` are the state_dict names of the arrays Flower passes (``list(net.state_dict())``);
    with the Message API they default to the ArrayRecord's keys. `fraction` of the updates are
    audited, chosen by a hash of (seed, round, node), so a run is reproducible; `rounds` lists
    rounds to audit instead. `lr`, `local_epochs` and `batch_size` are the clients' settings (the
    values a client declares in its reply's metrics, then the round's config, under the usual keys
    such as "lr" or "local-epochs", take precedence). `ground_truth(round, config)` returns the
    images (N, C, H, W in [0, 1]) and labels the client trained on, to score the reconstruction;
    without it the thresholds apply to the job's leakage estimate (shadow audits on proxy data,
    see docs/verdict.md), and the verdict is "unscored" only when there is none;
    `verdict` sets that estimate like the job request's field (e.g. ``{"shadows": 5, "budget":
    {"iterations": 500}, "proxy_data": "gt_..."}``). The model is a registered `arch`, or your
    own `model`: an ONNX file (each round's weights are written into its initializers), or with
    an embedded client an `nn.Module` or import path.
    The default attack is FedAvg unrolling when the training
    facts are known (knowledge level 3), else Inverting Gradients; the default threshold is a
    worst-case PSNR of 20 dB. `wait=True` waits for each job where it is submitted (tests, or a
    process that outlives its audits); by default the job is submitted and left to the service.
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
        verdict: Mapping[str, Any] | None = None,
        thresholds: Sequence[Threshold | Mapping[str, Any]] = DEFAULT_THRESHOLDS,
        ground_truth: GroundTruthFn | None = None,
        wait: bool = False,
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
        self.verdict = None if verdict is None else dict(verdict)  # the jobs' leakage-estimate options
        self.ground_truth = ground_truth
        self.wait = wait
        self.audits = AuditLog(client, thresholds=thresholds, path=log_path, timeout=timeout)
        self._lock = threading.Lock()
        self._calls = 0

    # --- which updates --------------------------------------------------------------------

    def round_of(self, config: Mapping[str, Any]) -> int:
        """The server round from the config, else the count of fit calls so far (from 1)."""
        with self._lock:
            self._calls += 1
            calls = self._calls
        for key in ROUND_KEYS:
            value = config.get(key)
            if _scalar(value):
                return int(value)
        return calls

    def should_audit(self, server_round: int, node_id: int | None = None) -> bool:
        if self.rounds is not None:
            return server_round in self.rounds
        key = f"{self.seed}:{server_round}" if node_id is None else f"{self.seed}:{server_round}:{node_id}"
        digest = hashlib.sha256(key.encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64 < self.fraction

    def training_facts(
        self, config: Mapping[str, Any], num_examples: int, declared: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """What the client did: the values it declared, then the round's config, else the
        auditor's."""
        sources = [dict(declared or {}), dict(config)]
        facts: dict[str, Any] = {}
        for name, keys in TRAINING_KEYS.items():
            found = [s[k] for s in sources for k in keys if k in s and _scalar(s[k])]
            value = found[0] if found else self.defaults[name]
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
        *,
        server_round: int | None = None,
        node_id: int | None = None,
        declared: Mapping[str, Any] | None = None,
        side: Side = "client",
    ) -> AuditRecord | None:
        """Called with the model a client received and the one it sends back; audits the update
        if it is sampled. Returns the record (its verdict follows from `collect()`, or at once
        with `wait=True`), or None when the update is not sampled."""
        if server_round is None:
            server_round = self.round_of(config)
        if not self.should_audit(server_round, node_id):
            return None
        record = AuditRecord(
            server_round,
            int(num_examples),
            self.training_facts(config, num_examples, declared),
            side=side,
            node_id=node_id,
        )
        self.audits.add(record)
        try:
            keys = list(names) if names is not None else self.names
            if keys is None:
                raise tensors.TensorInputError(
                    "give the auditor the state_dict names of the arrays (names=...)"
                )
            received = tensors.name_arrays([np.asarray(a) for a in before], keys)
            shared = tensors.name_arrays([np.asarray(a) for a in after], keys)
            truth = None
            if self.ground_truth is not None:
                truth = tensors.ground_truth(*self.ground_truth(server_round, dict(config)))
            self._submit(record, received, shared, truth)
        except Exception as e:  # a failed audit is recorded: it must never stop training
            log.warning("gradleak: %s", describe(record, f"not audited: {_reason(e)}"))
            self.audits.finish(record, error=_reason(e))
            return record
        self.audits.write(record)
        log.info("gradleak: %s", describe(record, f"submitted as job {record.job_id}"))
        if self.wait:
            self.audits.resolve(record)
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

    def _submit(
        self,
        record: AuditRecord,
        received: dict[str, np.ndarray],
        shared: dict[str, np.ndarray],
        truth: bytes | None,
    ) -> None:
        """Upload what the job needs and create it; the service runs it from there."""
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
        truth_id = None if truth is None else self.client.ground_truth.upload(truth).id
        attack, knowledge = self._job_settings(record.training)
        job = self.client.jobs.create(
            update_id=update.id,
            ground_truth_id=truth_id,
            attack=attack,
            knowledge=knowledge,
            budget=self.budget,
            verdict=self.verdict,
        )
        record.job_id, record.status = job.id, job.status

    def collect(self, timeout: float | None = None) -> list[AuditRecord]:
        """See `AuditLog.collect`."""
        return self.audits.collect(timeout)

    @property
    def records(self) -> list[AuditRecord]:
        return self.audits.records


# ---------------------------------------------------------------------------------------------
# the Message API: the server's strategy and the client's mod
# ---------------------------------------------------------------------------------------------


def _arrays(record: Any) -> tuple[NDArrays, list[str]]:
    names = [str(k) for k in record]
    if hasattr(record, "to_numpy_ndarrays"):
        return list(record.to_numpy_ndarrays()), names
    return [np.asarray(record[k].numpy()) for k in record], names


def _scalars(record: Any) -> dict[str, Any]:
    return {str(k): v for k, v in dict(record).items() if _scalar(v)}


class AuditedStrategy:
    """A Flower Message-API strategy that aggregates exactly what `strategy` aggregates and
    audits a sampled fraction of the train replies it receives (see the module's docstring).

    Each sampled reply is audited against the global model sent to that node in the same round,
    with the facts the node declared in its reply's metrics (then the round's config). The
    arrays and config are read from the messages `strategy.configure_train` builds, under the
    strategy's `arrayrecord_key` and `configrecord_key` ("arrays" and "config" by default), and
    the number of examples from its `weighted_by_key` ("num-examples")."""

    def __init__(self, strategy: Any, auditor: FlowerAuditor) -> None:
        self.strategy, self.auditor = strategy, auditor
        # (round, node) -> (the global arrays sent, their names, the config sent)
        self._sent: dict[tuple[int, int], tuple[NDArrays, list[str], dict[str, Any]]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.strategy, name)

    def _keys(self) -> tuple[str, str, str]:
        return (
            getattr(self.strategy, "arrayrecord_key", "arrays"),
            getattr(self.strategy, "configrecord_key", "config"),
            getattr(self.strategy, "weighted_by_key", "num-examples"),
        )

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        arrays_key, config_key, _ = self._keys()
        self._sent = {}
        for msg in messages:
            node_id = int(msg.metadata.dst_node_id)
            if not self.auditor.should_audit(server_round, node_id):
                continue
            try:
                # copies: the strategy may reuse or change the global model after this round
                sent, names = _arrays(msg.content[arrays_key])
                sent = [np.array(a, copy=True) for a in sent]
                sent_config = dict(msg.content[config_key]) if config_key in msg.content else {}
            except (KeyError, TypeError, ValueError) as e:
                log.warning("gradleak: cannot read the train message to node %d (%s)", node_id, e)
                continue
            self._sent[(server_round, node_id)] = (sent, names, sent_config)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> Any:
        replies = list(replies)
        arrays_key, _, weight_key = self._keys()
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            sent = self._sent.pop((server_round, node_id), None)
            if sent is None:
                continue
            before, names, config = sent
            if reply.has_error():
                error = f"node {node_id} replied with an error: {reply.error.reason}"
                self._lost(server_round, node_id, config, error)
                continue
            try:
                after, _ = _arrays(reply.content[arrays_key])
                metrics = _scalars(reply.content["metrics"]) if "metrics" in reply.content else {}
                num_examples = int(metrics[weight_key])
            except (KeyError, TypeError, ValueError) as e:
                self._lost(server_round, node_id, config, f"cannot read the reply ({type(e).__name__}: {e})")
                continue
            self.auditor.observe(
                before,
                after,
                num_examples,
                config,
                names=self.auditor.names or names,
                server_round=server_round,
                node_id=node_id,
                declared=metrics,
                side="server",
            )
        for server_round_, node_id in list(self._sent):  # sampled nodes that did not reply
            before, names, config = self._sent.pop((server_round_, node_id))
            self._lost(server_round_, node_id, config, f"node {node_id} did not reply")
        return self.strategy.aggregate_train(server_round, replies)

    def _lost(self, server_round: int, node_id: int, config: Mapping[str, Any], error: str) -> None:
        record = AuditRecord(server_round, 0, {}, side="server", node_id=node_id)
        self.auditor.audits.add(record)
        log.warning("gradleak: %s", describe(record, f"not audited: {error}"))
        self.auditor.audits.finish(record, error=error)

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)  # type: ignore[no-any-return]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Any]) -> Any:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def start(self, grid: Any, initial_arrays: Any, *args: Any, **kwargs: Any) -> Any:
        """Flower's round loop (`Strategy.start`), run through this wrapper."""
        from flwr.serverapp.strategy import Strategy

        return Strategy.start(self, grid, initial_arrays, *args, **kwargs)  # type: ignore[arg-type]


AuditorSource = FlowerAuditor | Callable[[Any], FlowerAuditor]


def gradleak_mod(
    auditor: AuditorSource,
    *,
    arrays_key: str = "arrays",
    config_key: str = "config",
    metrics_key: str = "metrics",
    num_examples_key: str = "num-examples",
) -> Callable[[Any, Any, Callable[[Any, Any], Any]], Any]:
    """A Flower Mod that audits train replies (the keys are those of Flower's strategies) and
    returns the reply unchanged. `auditor` is a FlowerAuditor, or a function of the message's
    Context returning one (to read the service URL or the record file from the run or node
    config). Names default to the ArrayRecord's keys (a torch state_dict's names when the app
    builds the record from one); the auditor's `names` take precedence."""

    def mod(msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        try:
            active = auditor if isinstance(auditor, FlowerAuditor) else auditor(context)
        except Exception as e:  # auditing must not stop training
            log.warning("gradleak: no auditor for this message (%s: %s); not audited", type(e).__name__, e)
            return reply
        try:
            before, names = _arrays(msg.content[arrays_key])
            after, _ = _arrays(reply.content[arrays_key])
            config = dict(msg.content[config_key]) if config_key in msg.content else {}
            metrics = _scalars(reply.content[metrics_key])
            num_examples = int(metrics[num_examples_key])
        except (KeyError, TypeError, ValueError) as e:
            log.warning("gradleak: cannot read the train message (%s); not audited", e)
            return reply
        node_id = getattr(context, "node_id", None)
        active.observe(
            before,
            after,
            num_examples,
            config,
            names=active.names or names,
            node_id=None if node_id is None else int(node_id),
            declared=metrics,
            side="client",
        )
        return reply

    return mod


# ---------------------------------------------------------------------------------------------
# the legacy client APIs
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
        new_parameters, num_examples, metrics = result
        self.auditor.observe(parameters, new_parameters, num_examples, config, declared=metrics)
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
            self.auditor.observe(before, after, res.num_examples, dict(ins.config), declared=res.metrics)
        return res


def _is_ok(status: Any) -> bool:
    code = getattr(status, "code", None)
    return getattr(code, "name", code) in ("OK", 0)
