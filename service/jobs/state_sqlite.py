"""Job state in one SQLite file: the embedded default.

The API process and its worker process open the same file; WAL lets readers run beside the
writer, and every read-modify-write runs in a `BEGIN IMMEDIATE` transaction, which serialises
writers across processes. One connection per store, guarded by a lock, is plenty: every
statement is an indexed lookup of a few rows.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.errors import NotFoundError
from service.jobs.records import (
    JOB_PREFIX,
    RUNNABLE,
    TERMINAL,
    ApiKeyRecord,
    Heartbeat,
    JobError,
    JobProgress,
    JobRecord,
    JobStatus,
    UploadRecord,
)
from service.jobs.state import released_outcome

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    worker_id TEXT,
    lease_expires_at REAL,
    cancel_requested INTEGER NOT NULL,
    progress TEXT,
    error TEXT,
    manifest TEXT,
    artifacts TEXT NOT NULL,
    queue_ref TEXT,
    idempotency_key TEXT,
    request_hash TEXT,
    max_running_jobs INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, id);
CREATE INDEX IF NOT EXISTS jobs_tenant_status ON jobs (tenant, status, id);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, lease_expires_at);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);

CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    metadata TEXT NOT NULL,
    tensors INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_expiry ON uploads (expires_at);
CREATE INDEX IF NOT EXISTS uploads_tenant ON uploads (tenant);

CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    quotas TEXT
);
"""

# Columns added after the first release: (table, column, type), added to older files on open.
_ADDED_COLUMNS = (("jobs", "max_running_jobs", "INTEGER"), ("api_keys", "quotas", "TEXT"))

_JSON_COLUMNS = ("progress", "error", "manifest", "artifacts")


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    data: dict[str, Any] = dict(row)
    for col in _JSON_COLUMNS:
        if data[col] is not None:
            data[col] = json.loads(data[col])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return JobRecord.model_validate(data)


def _job_to_row(job: JobRecord) -> dict[str, Any]:
    data = job.model_dump(mode="json")
    for col in _JSON_COLUMNS:
        if data[col] is not None:
            data[col] = json.dumps(data[col])
    data["cancel_requested"] = int(job.cancel_requested)
    return data


def _key_from_row(row: sqlite3.Row) -> ApiKeyRecord:
    data = dict(row)
    data["quotas"] = None if data["quotas"] is None else json.loads(data["quotas"])
    return ApiKeyRecord.model_validate(data)


def _upload_from_row(row: sqlite3.Row) -> UploadRecord:
    data = dict(row)
    data["metadata"] = json.loads(data["metadata"])
    return UploadRecord.model_validate(data)


class SQLiteStateStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            self._conn.executescript(_SCHEMA)  # idempotent; executescript manages its own transaction
            self._migrate()

    def _migrate(self) -> None:
        with self._tx() as c:
            for table, column, kind in _ADDED_COLUMNS:
                have = {r["name"] for r in c.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; the file-level lock it takes serialises writers across processes."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # --- API keys -----------------------------------------------------------------------------

    def add_key(self, key: ApiKeyRecord) -> None:
        with self._tx() as c:
            data = key.model_dump()
            data["quotas"] = None if key.quotas is None else json.dumps(key.quotas)
            c.execute(
                "INSERT INTO api_keys (id, tenant, name, digest, prefix, created_at, revoked_at, quotas) "
                "VALUES (:id, :tenant, :name, :digest, :prefix, :created_at, :revoked_at, :quotas)",
                data,
            )

    def find_key(self, digest: str) -> ApiKeyRecord | None:
        rows = self._query("SELECT * FROM api_keys WHERE digest = ?", (digest,))
        return _key_from_row(rows[0]) if rows else None

    def list_keys(self) -> list[ApiKeyRecord]:
        rows = self._query("SELECT * FROM api_keys ORDER BY id")
        return [_key_from_row(r) for r in rows]

    def revoke_key(self, key_id: str) -> ApiKeyRecord:
        with self._tx() as c:
            c.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
            row = c.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no API key {key_id!r}")
        return _key_from_row(row)

    # --- uploads ------------------------------------------------------------------------------

    def add_upload(self, upload: UploadRecord) -> None:
        data = upload.model_dump()
        data["metadata"] = json.dumps(data["metadata"])
        with self._tx() as c:
            c.execute(
                "INSERT INTO uploads VALUES (:id, :tenant, :kind, :key, :size, :sha256, :metadata, :tensors, "
                ":created_at, :expires_at)",
                data,
            )

    def get_upload(self, tenant: str, upload_id: str) -> UploadRecord:
        rows = self._query("SELECT * FROM uploads WHERE id = ? AND tenant = ?", (upload_id, tenant))
        if not rows:
            raise NotFoundError(f"no upload {upload_id!r}")
        return _upload_from_row(rows[0])

    def delete_upload(self, tenant: str, upload_id: str) -> UploadRecord:
        with self._tx() as c:
            row = c.execute(
                "SELECT * FROM uploads WHERE id = ? AND tenant = ?", (upload_id, tenant)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no upload {upload_id!r}")
            c.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
        return _upload_from_row(row)

    def list_uploads(self, tenant: str, kind: str, limit: int = 100) -> list[UploadRecord]:
        rows = self._query(
            "SELECT * FROM uploads WHERE tenant = ? AND kind = ? ORDER BY id DESC LIMIT ?",
            (tenant, kind, limit),
        )
        return [_upload_from_row(r) for r in rows]

    def expired_uploads(self, now: float, limit: int = 100) -> list[UploadRecord]:
        rows = self._query(
            "SELECT * FROM uploads WHERE expires_at < ? ORDER BY expires_at LIMIT ?", (now, limit)
        )
        return [_upload_from_row(r) for r in rows]

    # --- jobs: the API's side -----------------------------------------------------------------

    def create_job(self, job: JobRecord) -> tuple[JobRecord, bool]:
        row = _job_to_row(job)
        with self._tx() as c:
            if job.idempotency_key is not None:
                existing = c.execute(
                    "SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ?",
                    (job.tenant, job.idempotency_key),
                ).fetchone()
                if existing is not None:
                    return _job_from_row(existing), False
            cols = ", ".join(row)
            c.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join(':' + k for k in row)})", row)
        return job, True

    def get_job(self, tenant: str | None, job_id: str) -> JobRecord:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows or (tenant is not None and rows[0]["tenant"] != tenant):
            raise NotFoundError(f"no job {job_id!r}")
        return _job_from_row(rows[0])

    def list_jobs(
        self,
        tenant: str,
        status: JobStatus | None = None,
        limit: int = 50,
        before: str | None = None,
        kind: str = JOB_PREFIX,
    ) -> list[JobRecord]:
        # ids are "<kind>_<hex>": "_" sorts right before "`", so these bounds hold one kind
        sql, params = (
            "SELECT * FROM jobs WHERE tenant = ? AND id > ? AND id < ?",
            [tenant, f"{kind}_", f"{kind}`"],
        )
        if status is not None:
            sql += " AND status = ?"
            params.append(status.value)
        if before is not None:
            sql += " AND id < ?"
            params.append(before)
        sql += " ORDER BY id DESC LIMIT ?"
        return [_job_from_row(r) for r in self._query(sql, (*params, limit))]

    def request_cancel(self, tenant: str, job_id: str) -> JobRecord:
        now = time.time()
        with self._tx() as c:
            job = self._locked_get(c, job_id, tenant)
            if job.status in RUNNABLE:
                c.execute(
                    "UPDATE jobs SET status = ?, cancel_requested = 1, finished_at = ?, updated_at = ? "
                    "WHERE id = ?",
                    (JobStatus.CANCELLED.value, now, now, job_id),
                )
            elif job.status == JobStatus.RUNNING:
                c.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, job_id))
            return self._locked_get(c, job_id, tenant)

    def set_queue_ref(self, job_id: str, ref: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET queue_ref = ? WHERE id = ?", (ref, job_id))

    # --- jobs: the workers' side --------------------------------------------------------------

    def runnable(self, limit: int = 100) -> list[JobRecord]:
        rows = self._query(
            "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY id LIMIT ?",
            (JobStatus.QUEUED.value, JobStatus.INTERRUPTED.value, limit),
        )
        return [_job_from_row(r) for r in rows]

    def claim(self, job_id: str, worker_id: str, lease_s: float) -> JobRecord | None:
        now = time.time()
        with self._tx() as c:
            row = c.execute(
                "SELECT status, attempts, max_attempts FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None or row["status"] not in RUNNABLE or row["attempts"] >= row["max_attempts"]:
                return None
            c.execute(
                "UPDATE jobs SET status = ?, attempts = attempts + 1, worker_id = ?, lease_expires_at = ?, "
                "started_at = ?, updated_at = ?, progress = NULL, error = NULL WHERE id = ?",
                (JobStatus.RUNNING.value, worker_id, now + lease_s, now, now, job_id),
            )
            return self._locked_get(c, job_id, None)

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> Heartbeat:
        now = time.time()
        with self._tx() as c:
            row = c.execute(
                "SELECT cancel_requested FROM jobs WHERE id = ? AND status = ? AND worker_id = ?",
                (job_id, JobStatus.RUNNING.value, worker_id),
            ).fetchone()
            if row is None:
                return Heartbeat(owned=False)
            c.execute("UPDATE jobs SET lease_expires_at = ? WHERE id = ?", (now + lease_s, job_id))
        return Heartbeat(owned=True, cancel_requested=bool(row["cancel_requested"]))

    def set_progress(self, job_id: str, worker_id: str, progress: JobProgress) -> bool:
        with self._tx() as c:
            cur = c.execute(
                "UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ? AND status = ? AND worker_id = ?",
                (progress.model_dump_json(), time.time(), job_id, JobStatus.RUNNING.value, worker_id),
            )
            return cur.rowcount == 1

    def finish(
        self,
        job_id: str,
        worker_id: str,
        status: JobStatus,
        *,
        error: JobError | None = None,
        manifest: dict | None = None,
        artifacts: dict[str, str] | None = None,
    ) -> JobRecord | None:
        if status not in TERMINAL:
            raise ValueError(f"finish needs a final status, got {status}")
        now = time.time()
        with self._tx() as c:
            cur = c.execute(
                "UPDATE jobs SET status = ?, error = ?, manifest = ?, artifacts = ?, finished_at = ?, "
                "updated_at = ?, lease_expires_at = NULL WHERE id = ? AND status = ? AND worker_id = ?",
                (
                    status.value,
                    None if error is None else error.model_dump_json(),
                    None if manifest is None else json.dumps(manifest),
                    json.dumps(artifacts or {}),
                    now,
                    now,
                    job_id,
                    JobStatus.RUNNING.value,
                    worker_id,
                ),
            )
            return self._locked_get(c, job_id, None) if cur.rowcount == 1 else None

    def release(self, job_id: str, worker_id: str | None, error: JobError) -> JobRecord | None:
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = _job_from_row(row)
            if job.status != JobStatus.RUNNING:
                return None
            if worker_id is not None and job.worker_id != worker_id:
                return None
            if worker_id is None and (job.lease_expires_at or 0.0) > now:
                return None
            status, reason = released_outcome(job, error)
            c.execute(
                "UPDATE jobs SET status = ?, error = ?, worker_id = NULL, lease_expires_at = NULL, "
                "finished_at = ?, updated_at = ? WHERE id = ?",
                (status.value, reason.model_dump_json(), None if status in RUNNABLE else now, now, job_id),
            )
            return self._locked_get(c, job_id, None)

    def expired_leases(self, now: float) -> list[JobRecord]:
        rows = self._query(
            "SELECT * FROM jobs WHERE status = ? AND lease_expires_at < ?", (JobStatus.RUNNING.value, now)
        )
        return [_job_from_row(r) for r in rows]

    # --- retention and metrics ----------------------------------------------------------------

    def expired_jobs(self, now: float, limit: int = 100) -> list[JobRecord]:
        marks = ", ".join("?" for _ in TERMINAL)
        rows = self._query(
            f"SELECT * FROM jobs WHERE expires_at < ? AND status IN ({marks}) ORDER BY expires_at LIMIT ?",
            (now, *(s.value for s in TERMINAL), limit),
        )
        return [_job_from_row(r) for r in rows]

    def delete_job(self, job_id: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def count_by_status(self) -> dict[JobStatus, int]:
        counts = {s: 0 for s in JobStatus}
        for row in self._query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            counts[JobStatus(row["status"])] = row["n"]
        return counts

    # --- quotas -------------------------------------------------------------------------------

    def count_running_jobs(self, tenant: str) -> int:
        rows = self._query(
            "SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND status = ?",
            (tenant, JobStatus.RUNNING.value),
        )
        return int(rows[0]["n"])

    def count_waiting_jobs(self, tenant: str) -> int:
        rows = self._query(
            "SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND status IN (?, ?)",
            (tenant, JobStatus.QUEUED.value, JobStatus.INTERRUPTED.value),
        )
        return int(rows[0]["n"])

    def stored_bytes(self, tenant: str) -> int:
        rows = self._query("SELECT COALESCE(SUM(size), 0) AS n FROM uploads WHERE tenant = ?", (tenant,))
        return int(rows[0]["n"])

    def ping(self) -> None:
        self._query("SELECT 1")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _locked_get(self, c: sqlite3.Connection, job_id: str, tenant: str | None) -> JobRecord:
        row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFoundError(f"no job {job_id!r}")
        return _job_from_row(row)
