"""The ``ftaas`` commands: train, jobs, job, cancel, generate, datasets, serve.

Each talks HTTP to ``--url`` / ``FTAAS_URL`` (default http://127.0.0.1:8000), sending ``FTAAS_API_KEY`` as a bearer
token when set. Server errors print one line, ``error: <code>: <message>``, and exit 1; an unreachable
server exits 2.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from app.cli.client import DEFAULT_URL, Client, CliError
from app.cli.follow import follow
from app.cli.views import console, datasets_table, job_details, jobs_table, print_summary
from app.core.ids import is_dataset_id

P = ParamSpec("P")
R = TypeVar("R")
DATASET_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

app = typer.Typer(name="ftaas", help="Fine-tune as a service: train LoRA adapters and generate with them.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
datasets_app = typer.Typer(help="Upload and list datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
keys_app = typer.Typer(help="Make API keys for the server's keys file.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
#: Options given before the command (``ftaas --api-key K jobs``).
_OPTIONS: dict[str, str | None] = {}


@app.callback()
def _global_options(
    url: Annotated[str, typer.Option(
        "--url", envvar="FTAAS_URL", help="The ftaas server (or set FTAAS_URL).")] = DEFAULT_URL,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="FTAAS_API_KEY", show_default=False,
        help="API key sent as 'Authorization: Bearer' (or set FTAAS_API_KEY).")] = None,
) -> None:
    _OPTIONS["url"], _OPTIONS["api_key"] = url, api_key or None


def _client() -> Client:
    return Client(url=_OPTIONS.get("url") or DEFAULT_URL, api_key=_OPTIONS.get("api_key") or "")


def handled(fn: Callable[P, R]) -> Callable[P, R]:
    """Show a CliError as one line on stderr and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CliError as e:
            typer.echo(e.line(), err=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def _json_object(text: str | None, option: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError("invalid_argument", f"{option} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CliError("invalid_argument", f"{option} must be a JSON object")
    return value


def _dataset_ref(client: Client, data: str) -> dict[str, Any]:
    """An uploaded dataset's id as given, or a local file uploaded now."""
    if is_dataset_id(data):
        return {"id": data}
    path = Path(data)
    if not path.is_file():
        raise CliError("invalid_argument", f"{data!r} is neither a file nor a dataset id (ds_…)")
    if path.suffix.lower() not in DATASET_SUFFIXES:
        raise CliError("invalid_argument", f"{path.name}: a dataset file ends in {', '.join(DATASET_SUFFIXES)}")
    ds = client.upload(path)
    console().print(f"uploaded {path.name} as {ds['id']} ({ds['row_count']} rows, {ds['format']})")
    return {"id": ds["id"]}


@app.command()
@handled
def train(
    data: Annotated[str, typer.Argument(
        metavar="DATA", help="A .jsonl/.json/.csv/.parquet file to upload, or a ds_… id.")],
    base_model: Annotated[str | None, typer.Option("--base-model", "-m", help="Base model (server default).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", "-s", help="Optimizer steps (max_steps).")] = None,
    template: Annotated[str | None, typer.Option(help="str.format template over the row's columns.")] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", help="auto, template, text, prompt_completion or messages.")] = None,
    name: Annotated[str | None, typer.Option(help="A label for the job.")] = None,
    hyperparameters: Annotated[str | None, typer.Option(
        "--hyperparameters", "-H", help='More hyperparameters as JSON, e.g. \'{"batch_size": 2}\'.')] = None,
    sample_prompt: Annotated[list[str] | None, typer.Option(
        "--sample-prompt", help="A prompt to sample before and after training (repeatable).")] = None,
    follow_job: Annotated[bool, typer.Option(
        "--follow", "-f", help="Show live progress until the job ends; Ctrl-C asks whether to cancel.")] = False,
) -> None:
    """Create a training job from DATA; with --follow, watch it train and print the adapter and samples."""
    hp = _json_object(hyperparameters, "--hyperparameters")
    if steps is not None:
        hp["max_steps"] = steps
    out = console()
    with _client() as client:
        body: dict[str, Any] = {"dataset": _dataset_ref(client, data), "hyperparameters": hp}
        optional = {"base_model": base_model, "template": template, "format": fmt, "name": name,
                    "sample_prompts": sample_prompt or None}
        body |= {k: v for k, v in optional.items() if v is not None}
        job = client.post("/jobs", json=body)
        out.print(f"created {job['id']} ({job['status']}, {job['progress']['total_steps']} steps on "
                  f"{job['request']['base_model']})")
        if not follow_job:
            return
        final = follow(client, out, job)
    _finish(out, final)


def _finish(out: Console, final: dict[str, Any] | None) -> None:
    """After following: the summary, and exit 1 unless the job succeeded (nothing when detached)."""
    if final is None:
        return
    print_summary(out, final)
    if final["status"] == "failed" and final.get("error"):
        raise CliError(final["error"]["code"], final["error"]["message"])
    if final["status"] != "succeeded":
        raise typer.Exit(1)


def _print_page(page: dict[str, Any], table: Callable[[list[dict[str, Any]]], Any], what: str,
                command: str) -> None:
    """A listed page as a table, with the command for the next page when there is one."""
    out = console()
    if not page["data"]:
        out.print(f"no {what}")
        return
    out.print(table(page["data"]))
    if page.get("has_more"):
        out.print(f"more: {command} --after {page['next_after']}")


@app.command("jobs")
@handled
def list_jobs(
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed or cancelled.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    after: Annotated[str | None, typer.Option(help="A job id: list the jobs older than it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON page.")] = False,
) -> None:
    """List jobs, newest first."""
    params: dict[str, Any] = {"limit": limit} | ({"status": status} if status else {}) | (
        {"after": after} if after else {})
    with _client() as client:
        page = client.get("/jobs", params=params)
    out = console()
    if as_json:
        out.print_json(data=page)
        return
    _print_page(page, jobs_table, "jobs", "ftaas jobs")


@app.command("job")
@handled
def show_job(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="A job id (job_…).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the job record as JSON.")] = False,
    follow_job: Annotated[bool, typer.Option(
        "--follow", "-f", help="Show live progress until the job ends; Ctrl-C asks whether to cancel.")] = False,
) -> None:
    """Show one job: status, progress, metrics, dataset stats, evaluation and samples; or --follow it."""
    out = console()
    with _client() as client:
        job = client.get(f"/jobs/{job_id}")
        if follow_job:
            _finish(out, follow(client, out, job))
            return
    if as_json:
        out.print_json(data=job)
        return
    out.print(job_details(job))
    if job.get("evaluation"):
        out.print()
        print_summary(out, job)


@app.command()
@handled
def cancel(job_id: Annotated[str, typer.Argument(metavar="ID", help="A job id (job_…).")]) -> None:
    """Cancel a job: a queued one at once, a running one at its next step."""
    with _client() as client:
        job = client.post(f"/jobs/{job_id}/cancel")
    if job["status"] == "cancelled":
        console().print(f"{job_id} cancelled")
    else:
        console().print(f"{job_id} cancel requested: it stops at its next step")


@app.command()
@handled
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt to continue.")],
    adapter: Annotated[str | None, typer.Option(help="A succeeded job's id; none: the base model.")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", "-m", help="Base model without adapter.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
) -> None:
    """Continue PROMPT with the base model or an adapter; prints the text as it streams, when the server streams."""
    body: dict[str, Any] = {"prompt": prompt, "max_new_tokens": max_new_tokens}
    body |= {k: v for k, v in {"adapter": adapter, "base_model": base_model}.items() if v}
    with _client() as client:
        for piece in client.stream_post("/generate", body):
            typer.echo(piece, nl=False)
    typer.echo()


@datasets_app.command("upload")
@handled
def upload(file: Annotated[Path, typer.Argument(help="A .jsonl, .json, .csv or .parquet file.")]) -> None:
    """Upload a dataset file; prints its id, rows and columns."""
    with _client() as client:
        ds = client.upload(file)
    out = console()
    out.print(f"{ds['id']}  {ds['filename']}: {ds['row_count']} rows ({ds['format']}), "
              f"columns: {', '.join(ds['columns'])}")
    if ds.get("dropped_rows"):
        out.print(f"{ds['dropped_rows']} empty rows left out")


@datasets_app.command("list")
@handled
def list_datasets(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    after: Annotated[str | None, typer.Option(help="A dataset id: list the ones older than it.")] = None,
) -> None:
    """List uploaded datasets, newest first."""
    with _client() as client:
        page = client.get("/datasets", params={"limit": limit} | ({"after": after} if after else {}))
    _print_page(page, datasets_table, "datasets", "ftaas datasets list")


@keys_app.command("new")
def new_key(
    tenant: Annotated[str, typer.Option(help="The tenant the key belongs to (a-z, 0-9, _ . -).")],
    admin: Annotated[bool, typer.Option("--admin", help="An admin key: sees every tenant's jobs.")] = False,
) -> None:
    """Print a new API key once, and the line to add to the server's FTAAS_API_KEYS_FILE (its hash)."""
    from app.core.apikeys import TENANT_PATTERN, entry_line, new_key  # stdlib + pydantic only

    if not re.fullmatch(TENANT_PATTERN, tenant):
        typer.echo(f"error: invalid_argument: tenant must match {TENANT_PATTERN}", err=True)
        raise typer.Exit(1)
    key = new_key()
    typer.echo(f"key (shown once; give it to the tenant): {key}")
    typer.echo(f"line for FTAAS_API_KEYS_FILE: {entry_line(key, tenant, admin)}")


@app.command()
def serve() -> None:
    """Run the whole service on this machine (what `make run` runs): Redis if needed, the API, both workers."""
    from app import serve as service  # heavy (Redis, Celery): only for this command

    raise typer.Exit(service.main())


def main() -> None:
    """The ``ftaas`` console script."""
    app(prog_name="ftaas")
