"""The service's commands of `gradleak`: `serve`, `worker`, `keys create|list|revoke` and
`assets fetch`.

`register(app)` adds them to the `gradleak` typer app. The API and the worker are imported when
a command runs, so that `gradleak attack` does not pay for them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from service.errors import NotFoundError
from service.settings import Settings, get_settings


def _fail(message: str) -> typer.Exit:
    typer.echo(f"gradleak: error: {message}", err=True)
    return typer.Exit(code=2)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    host: Annotated[
        str | None, typer.Option(help="address to bind (default GRADLEAK_HOST, 127.0.0.1)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port (default GRADLEAK_PORT, 8731)")] = None,
) -> None:
    """Run the REST API. With nothing configured it also runs the jobs (one at a time, in a
    worker process), keeps job state in SQLite and artifacts in a local folder."""
    import uvicorn

    from api.app import create_app
    from api.observability import configure_logging
    from api.runtime import auth_enabled

    changes = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings: Settings = get_settings().model_copy(update=changes)
    try:
        app = create_app(settings)
        auth = auth_enabled(settings)
    except ValueError as e:
        raise _fail(str(e)) from None
    configure_logging(settings.log_level)
    url = _url(settings.host, settings.port)
    typer.echo(f"gradleak API on {url}  (docs: {url}/docs)")
    if auth:
        typer.echo("API keys: required (Authorization: Bearer <key>; create one with `gradleak keys create`)")
    else:
        typer.echo(
            f"API keys: NOT required: bound to the loopback address {settings.host}, so only this machine "
            "can connect. Set GRADLEAK_AUTH_REQUIRED=true to require keys."
        )
    queue = "arq on Redis (run `gradleak worker`)" if settings.redis_url else "embedded worker process"
    state = "Redis" if settings.redis_url else f"SQLite in {settings.data_dir}"
    artifacts = f"S3 {settings.s3_endpoint}" if settings.s3_endpoint else f"{settings.data_dir / 'artifacts'}"
    typer.echo(f"jobs: {queue}; state: {state}; artifacts: {artifacts}")
    uvicorn.run(
        app, host=settings.host, port=settings.port, access_log=False, log_config=None, server_header=False
    )


def worker() -> None:
    """Run an arq worker that takes jobs from Redis (GRADLEAK_REDIS_URL); run one per GPU."""
    from api.observability import configure_logging
    from service.jobs.worker import run_worker

    settings = get_settings()
    if not settings.redis_url:
        raise _fail(
            "`gradleak worker` takes jobs from Redis: set GRADLEAK_REDIS_URL. Without Redis, "
            "`gradleak serve` runs the jobs itself."
        )
    configure_logging(settings.log_level)
    run_worker(settings)


def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant the key acts for")],
    name: Annotated[str, typer.Option(help="a note to tell keys apart")] = "",
    quota: Annotated[
        list[str] | None,
        typer.Option(
            help="override a quota for this key, name=value (repeatable): rate_read_per_s, "
            "rate_read_burst, rate_write_per_s, rate_write_burst, max_running_jobs, max_queued_jobs, "
            "max_stored_bytes"
        ),
    ] = None,
) -> None:
    """Create an API key. The key is printed once, on stdout; only its hash is stored."""
    from service.jobs.keys import create_key
    from service.jobs.quotas import parse_overrides
    from service.jobs.state import open_state_store

    try:
        overrides = parse_overrides(quota or [])
    except ValueError as e:
        raise _fail(str(e)) from None
    state = open_state_store(get_settings())
    try:
        token, record = create_key(state, tenant, name, quotas=overrides)
    except ValueError as e:
        raise _fail(str(e)) from None
    finally:
        state.close()
    typer.echo(f"created {record.id} for tenant {record.tenant}; the key is shown only now:", err=True)
    typer.echo(token)


def keys_list() -> None:
    """List API keys (never the keys themselves)."""
    from service.jobs.state import open_state_store

    state = open_state_store(get_settings())
    try:
        keys = state.list_keys()
    finally:
        state.close()
    if not keys:
        typer.echo("no API keys; create one with `gradleak keys create --tenant NAME`")
        return
    for k in keys:
        status = "active" if k.revoked_at is None else f"revoked {_date(k.revoked_at)}"
        quotas = "" if not k.quotas else "  quotas=" + ",".join(f"{q}={v:g}" for q, v in k.quotas.items())
        typer.echo(
            f"{k.id}  {k.prefix}...  tenant={k.tenant}  name={k.name or '-'}  {_date(k.created_at)}  "
            f"{status}{quotas}"
        )


def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (key_...), see `keys list`")],
) -> None:
    """Revoke an API key; requests with it are refused within seconds."""
    from service.jobs.state import open_state_store

    state = open_state_store(get_settings())
    try:
        record = state.revoke_key(key_id)
    except NotFoundError as e:
        raise _fail(str(e)) from None
    finally:
        state.close()
    typer.echo(f"revoked {record.id} (tenant {record.tenant})")


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def assets_fetch(
    name: Annotated[str, typer.Argument(help="the asset: lpips (LPIPS's AlexNet backbone)")],
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="where to store it (default GRADLEAK_LPIPS_WEIGHTS_DIR, else the torch hub cache)"
        ),
    ] = None,
    url: Annotated[str | None, typer.Option(help="download from this URL instead (a mirror)")] = None,
) -> None:
    """Download a file a metric needs, once, and store it where the metric looks after checking
    its pinned sha256."""
    from service.assets import AssetError, default_dir, fetch, get_asset

    try:
        asset = get_asset(name)
        folder = directory if directory is not None else default_dir(get_settings().lpips_weights_dir)
        path, downloaded = fetch(asset, folder, url)
    except AssetError as e:
        raise _fail(str(e)) from None
    typer.echo(f"{'fetched' if downloaded else 'already present'}: {path} (sha256 {asset.sha256})")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
    keys = typer.Typer(
        help="Manage API keys (stored as hashes in the job state store).", no_args_is_help=True
    )
    keys.command("create")(keys_create)
    keys.command("list")(keys_list)
    keys.command("revoke")(keys_revoke)
    app.add_typer(keys, name="keys")
    assets = typer.Typer(
        help="Fetch the files metrics need, checked against pinned sha256s.", no_args_is_help=True
    )
    assets.command("fetch")(assets_fetch)
    app.add_typer(assets, name="assets")
