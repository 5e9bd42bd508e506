"""`idlegrid`: submit jobs to an Idlegrid marketplace and follow them (docs/api/client.md).

    idlegrid login --username alice
    idlegrid submit --kind inference --architecture mlp --config '{"in_features": 16, "hidden": [32], "out_features": 4}' \\
        --weights model.safetensors --dataset data.safetensors --rows-per-unit 100 --watch
    idlegrid jobs --state running
    idlegrid watch 7
    idlegrid download 7 -o output.safetensors

Progress bars and prompts go to stderr; results (tables, or JSON with --json) to stdout.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.prompt import Confirm
from rich.table import Table

from idlegrid_client import config
from idlegrid_client._version import __version__
from idlegrid_client.client import (
    ApiError,
    Client,
    ClientError,
    Job,
    Quote,
    RetryPolicy,
    Rounds,
    ServerUnreachable,
    WaitTimeout,
    file_sha256,
)

EXIT_OK = 0
EXIT_ERROR = 1  # the server refused (the message says why), a bad answer, a refused confirmation
EXIT_USAGE = 2  # argparse's own
EXIT_UNREACHABLE = 3  # no answer from the server, after the retries that were safe
EXIT_JOB_FAILED = 4  # watch / submit --watch: the job failed
EXIT_JOB_CANCELLED = 5  # watch / submit --watch: the job was cancelled
EXIT_TIMEOUT = 6  # watch --timeout passed before the job finished
EXIT_INTERRUPTED = 130

EPILOG = """\
exit codes: 0 done (watch: the job completed); 1 refused by the server or another error; 2 bad usage;
3 server unreachable; 4 the watched job failed; 5 the watched job was cancelled; 6 watch --timeout passed;
130 interrupted.

The URL comes from --url, else $IDLEGRID_URL, else the config file, else http://127.0.0.1:8000; the token from
--token, else $IDLEGRID_TOKEN, else the config file that `idlegrid login` writes ($IDLEGRID_CONFIG, else
~/.config/idlegrid/config.toml, mode 0600)."""

SHA256 = re.compile(r"[0-9a-f]{64}")
# Spec fields that name an artifact: a local file given there is uploaded and replaced by its sha256.
ARTIFACT_FIELDS = (("model", "weights"), ("dataset",), ("train_dataset",), ("eval_dataset",), ("known_answers",))
INT_FLAGS = ("rows_per_unit", "batch_size", "quorum", "max_results_per_unit", "unit_timeout_seconds", "rounds",
             "shards", "local_epochs")
FLOAT_FLAGS = ("learning_rate",)

# A person is waiting: a few seconds of retries (connection refused, 5xx, 429), not the library's minute.
CLI_RETRY = RetryPolicy(attempts=4, base_seconds=0.5, cap_seconds=10.0)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


# --- the parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idlegrid", description="Submit jobs to an Idlegrid marketplace and follow them.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common_options(parser, defaults=True)
    # Accepted after the command too (`jobs --json`); SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=text, description=text, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler)
        return sub

    login = command("login", cmd_login, "log in with a username and password; save the token in the config file")
    login.add_argument("--username", help="default: asked")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin (default: asked)")

    for name, handler, text in (("submit", cmd_submit, "upload the files, quote, confirm and submit a job"),
                                ("quote", cmd_quote, "upload the files and show what a job would cost and take")):
        sub = command(name, handler, text)
        _add_spec_options(sub)
        if name == "submit":
            sub.add_argument("-y", "--yes", action="store_true", help="submit without asking")
            sub.add_argument("--watch", action="store_true", help="then watch it until it finishes")
            sub.add_argument("--idempotency-key", help="retry a submission safely with the same key (default: a new uuid4)")
            _add_watch_options(sub)

    jobs = command("jobs", cmd_jobs, "list your jobs, newest first")
    jobs.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    jobs.add_argument("--kind", help="only jobs of this kind")
    jobs.add_argument("--created-after", help="ISO 8601 time")
    jobs.add_argument("--created-before", help="ISO 8601 time")
    jobs.add_argument("--limit", type=_positive_int, default=20, help="at most this many (default 20)")

    command("job", cmd_job, "show one job").add_argument("job_id", type=_positive_int, metavar="ID")
    watch = command("watch", cmd_watch, "follow a job live until it finishes (exit 0 when it completed)")
    watch.add_argument("job_id", type=_positive_int, metavar="ID")
    _add_watch_options(watch)
    command("cancel", cmd_cancel, "cancel a job; its unused escrow returns").add_argument(
        "job_id", type=_positive_int, metavar="ID")
    download = command("download", cmd_download, "download a completed job's output (sha256 checked)")
    download.add_argument("job_id", type=_positive_int, metavar="ID")
    download.add_argument("-o", "--output", type=Path, help="file to write (default: job-ID-output.safetensors)")
    download.add_argument("--round", type=int, help="fedavg: that round's aggregated weights instead of the output")
    return parser


def _add_common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    default: Any = None if defaults else argparse.SUPPRESS
    parser.add_argument("--url", default=default, help=f"the marketplace (default: ${config.URL_ENV} or the config file)")
    parser.add_argument("--token", default=default, help=f"API token (default: ${config.TOKEN_ENV} or the config file)")
    parser.add_argument("--json", action="store_true", default=False if defaults else argparse.SUPPRESS,
                        help="print JSON on stdout instead of tables")


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    spec = parser.add_argument_group("the job", "a --spec file, friendly flags, or both (flags win)")
    spec.add_argument("--spec", type=Path, help='JSON: a spec, or {"kind": ..., "spec": {...}}; artifact fields may '
                                               "name local files (uploaded) or sha256s")
    spec.add_argument("--kind", choices=("inference", "fedavg"), help="default: the spec file's, else inference")
    spec.add_argument("--architecture", help="a registry architecture: mlp, cnn")
    spec.add_argument("--config", type=_json_value, help="the architecture's config, JSON (or @file.json)")
    spec.add_argument("--weights", help="a safetensors file (uploaded) or the sha256 of one already uploaded")
    spec.add_argument("--dataset", help="inference: safetensors file with tensor x")
    spec.add_argument("--train-dataset", help="fedavg: safetensors file with x and y")
    spec.add_argument("--eval-dataset", help="fedavg: the held-out x and y")
    for flag in INT_FLAGS:
        spec.add_argument(f"--{flag.replace('_', '-')}", type=_positive_int, dest=flag)
    for flag in FLOAT_FLAGS:
        spec.add_argument(f"--{flag.replace('_', '-')}", type=float, dest=flag)
    spec.add_argument("--price", type=_amount, help="price_per_result, base units (an integer)")
    spec.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="extra",
                      help="any other spec field, VALUE as JSON (else a string); repeatable")


def _add_watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds (exit 6)")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _amount(text: str) -> str:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of base units (digits only)")
    return text


def _json_value(text: str) -> Any:
    try:
        return json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


# --- running ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except ApiError as exc:
        err.print(f"[red]refused:[/] {escape(str(exc))}")
        return EXIT_ERROR
    except ServerUnreachable as exc:
        err.print(f"[red]server unreachable:[/] {escape(str(exc))}")
        return EXIT_UNREACHABLE
    except WaitTimeout as exc:
        err.print(f"[yellow]{escape(str(exc))}[/]")
        return EXIT_TIMEOUT
    except ClientError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED


def _client(args: argparse.Namespace) -> Client:
    settings = config.resolve(url=args.url, token=args.token)
    if not settings.token:
        raise ClientError(f"no API token for {settings.url}: run `idlegrid login`, pass --token or set "
                          f"${config.TOKEN_ENV}")
    return Client(settings.url, settings.token, retry=CLI_RETRY)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def cmd_login(args: argparse.Namespace) -> int:
    settings = config.resolve(url=args.url)
    username = args.username or err.input("username: ")
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("password: ")
    with Client(settings.url, retry=CLI_RETRY) as client:
        info = client.login(username, password)
    config.write_config(settings.config_path, url=settings.url, token=info.token)
    if args.json:
        _print_json({"url": settings.url, "token_key": info.token_key, "expiry": info.expiry,
                     "config": str(settings.config_path)})
    else:
        out.print(f"logged in to {escape(settings.url)} as {escape(username)}; token {info.token_key}… saved to "
                  f"{escape(str(settings.config_path))} (expires {info.expiry})")
    return EXIT_OK


# --- submit and quote -------------------------------------------------------------------------------

def cmd_quote(args: argparse.Namespace) -> int:
    with _client(args) as client:
        kind, spec = job_spec(args, client)
        quote = client.quote(kind, spec)
    if args.json:
        _print_json(asdict(quote))
    else:
        out.print(quote_table(quote))
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        kind, spec = job_spec(args, client)
        quote = client.quote(kind, spec)
        if not args.json:
            out.print(quote_table(quote))
        if not args.yes and not _confirmed(quote):
            err.print("not submitted")
            return EXIT_ERROR
        job = client.submit(kind, spec, idempotency_key=args.idempotency_key)
        if not args.json:
            out.print(f"job [bold]{job.id}[/] submitted ({job.state}); follow it with `idlegrid watch {job.id}`")
        elif not args.watch:
            _print_json(job.raw)
        if args.watch:
            return _watch_to_exit(client, job.id, args)
    return EXIT_OK


def _confirmed(quote: Quote) -> bool:
    if not sys.stdin.isatty():
        raise ClientError("not submitted: pass --yes to submit without a terminal to confirm on")
    if not quote.affordable:
        err.print("[yellow]your balance does not cover the escrow: the submission will be refused[/]")
    return Confirm.ask(f"Submit it, escrowing {quote.cost_worst_case} base units?", default=False, console=err)


def job_spec(args: argparse.Namespace, client: Client) -> tuple[str, dict[str, Any]]:
    """The kind and spec the options describe, every local file among its artifacts uploaded."""
    kind, spec = _spec_file(args.spec)
    kind = args.kind or kind or "inference"
    model = dict(spec.get("model") or {})
    for key, value in (("architecture", args.architecture), ("config", args.config), ("weights", args.weights)):
        if value is not None:
            model[key] = value
    if model:
        spec["model"] = model
    for key in ("dataset", "train_dataset", "eval_dataset", *INT_FLAGS, *FLOAT_FLAGS):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.price is not None:
        spec["price_per_result"] = args.price
    for item in args.extra:
        key, equals, value = item.partition("=")
        if not key or not equals:
            raise ClientError(f"--set {item!r}: expected KEY=VALUE (VALUE as JSON, or else a string)")
        spec[key] = _json_or_text(value)
    base = args.spec.parent if args.spec else Path.cwd()
    _upload_artifacts(client, spec, base)
    return kind, spec


def _spec_file(path: Path | None) -> tuple[str | None, dict[str, Any]]:
    if path is None:
        return None, {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot read the spec file {path}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("spec"), dict) and set(data) <= {"kind", "spec"}:
        return data.get("kind"), dict(data["spec"])
    if not isinstance(data, dict):
        raise ClientError(f"the spec file {path} holds {type(data).__name__}, not an object")
    return None, data


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _upload_artifacts(client: Client, spec: dict[str, Any], base: Path) -> None:
    """Each artifact field naming a file (not a sha256) is uploaded, with a progress bar, and named by hash."""
    files: list[tuple[dict[str, Any], str, Path]] = []
    for path in ARTIFACT_FIELDS:
        holder: Any = spec
        for key in path[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        value = holder.get(path[-1]) if isinstance(holder, dict) else None
        if not isinstance(value, str) or SHA256.fullmatch(value):
            continue
        file = Path(value).expanduser()
        file = file if file.is_absolute() or file.exists() else base / file
        if not file.is_file():
            raise ClientError(f"{'.'.join(path)}: {value} is neither a file nor the sha256 of an uploaded artifact")
        files.append((holder, path[-1], file))
    if not files:
        return
    with transfer_progress() as progress:
        for holder, key, file in files:
            holder[key] = _upload_one(client, progress, file)


def _upload_one(client: Client, progress: Progress, file: Path) -> str:
    task = progress.add_task(f"hashing {file.name}", total=file.stat().st_size)
    sha256 = file_sha256(file, progress=_advance(progress, task))
    progress.update(task, description=f"uploading {file.name}", completed=0)
    client.upload(file, sha256=sha256, progress=_advance(progress, task))
    progress.update(task, description=f"uploaded {file.name} {sha256[:12]}")
    return sha256


def _advance(progress: Progress, task: TaskID) -> Callable[[int, int | None], None]:
    def update(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    return update


@contextmanager
def transfer_progress() -> Iterator[Progress]:
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err, transient=False) as progress:
        yield progress


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def quote_table(quote: Quote) -> Table:
    """The quote as a table; the server's own texts (reasons, sources) are shown as text, never as markup."""
    table = Table(title=f"quote: {escape(quote.kind)} job", show_header=False)
    eta = (f"{_duration(quote.eta_seconds_p50)} (p50), {_duration(quote.eta_seconds_p90)} (p90)"
           if quote.eta_seconds_p50 is not None else f"unknown: {escape(quote.eta_reason or '')}")
    rows = [
        ("units", f"{quote.units} (quorum {quote.quorum})"),
        ("price per result", f"{quote.price_per_result} base units"),
        ("expected cost", f"{quote.cost_expected} ({quote.results_per_unit_expected} results per unit: "
                          f"{escape(quote.results_per_unit_source)})"),
        ("escrow (worst case)", f"{quote.cost_worst_case}; unused escrow returns when the job ends"),
        ("balance available", f"{quote.balance_available}" + ("" if quote.affordable else "  [red]not enough[/]")),
        ("devices active", f"{quote.devices_active} of {quote.owners_active} owner(s)"),
        ("runnable", "yes" if quote.runnable else f"[yellow]not now[/]: {escape(quote.not_runnable_reason or '')}"),
        ("ETA", eta),
    ]
    for label, value in rows:
        table.add_row(label, value)
    return table


# --- jobs, job, cancel, download --------------------------------------------------------------------

def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = list(client.jobs(state=args.state, kind=args.kind, created_after=args.created_after,
                                created_before=args.created_before, limit=args.limit))
    if args.json:
        _print_json([job.raw for job in jobs])
        return EXIT_OK
    table = Table("id", "kind", "state", "units", "valid", "invalid", "created", title=f"{len(jobs)} job(s)")
    for job in jobs:
        table.add_row(str(job.id), job.kind, _state(job.state), f"{job.units_done}/{job.units_total}",
                      str(job.results_valid), str(job.results_invalid), job.created_at)
    out.print(table)
    return EXIT_OK


def _state(state: str) -> str:
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow", "cancelling": "yellow"}.get(state)
    return f"[{colour}]{state}[/]" if colour else state


def cmd_job(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job_id)
    if args.json:
        _print_json(job.raw)
        return EXIT_OK
    out.print(job_table(job))
    return EXIT_OK


def job_table(job: Job) -> Table:
    table = Table(title=f"job {job.id}", show_header=False)
    for label, value in [("kind", job.kind), ("state", _state(job.state)),
                         ("units", f"{job.units_done}/{job.units_total} done, {job.units_error} in error"),
                         ("results", f"{job.results_valid} valid, {job.results_invalid} invalid"),
                         ("results per unit", str(job.results_per_unit or "-")),
                         ("output", job.output_sha256 or "-"), ("created", job.created_at),
                         ("started", job.started_at or "-"), ("finished", job.finished_at or "-"),
                         ("error", escape(job.error) or "-")]:
        table.add_row(label, value)
    return table


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    if args.json:
        _print_json(job.raw)
    else:
        out.print(f"job {job.id} is {_state(job.state)}")
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    what = "output" if args.round is None else f"round-{args.round}"
    target: Path = args.output or Path(f"job-{args.job_id}-{what}.safetensors")
    with _client(args) as client:
        weights = None if args.round is None else _round_weights(client, args.job_id, args.round)
        with transfer_progress() as progress:
            task = progress.add_task(f"job {args.job_id} {what}", total=None)
            if weights is None:
                sha256 = client.download(args.job_id, target, progress=_advance(progress, task))
            else:
                sha256 = client.download_artifact(weights, target, progress=_advance(progress, task))
    if args.json:
        _print_json({"job_id": args.job_id, "path": str(target), "sha256": sha256, "size": target.stat().st_size})
    else:
        out.print(f"wrote {escape(str(target))} ({target.stat().st_size} bytes, sha256 {sha256})")
    return EXIT_OK


def _round_weights(client: Client, job_id: int, index: int) -> str:
    for r in client.rounds(job_id).rounds:
        if r.round == index:
            return r.weights_sha256
    raise ClientError(f"job {job_id} has no aggregated round {index} (yet)")


# --- watch ------------------------------------------------------------------------------------------

def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _watch_to_exit(client, args.job_id, args)


def _watch_to_exit(client: Client, job_id: int, args: argparse.Namespace) -> int:
    job = watch(client, job_id, interval=args.interval, timeout=args.timeout)
    if args.json:
        _print_json(job.raw)
    else:
        out.print(f"job {job.id} {_state(job.state)}: {job.units_done}/{job.units_total} units, "
                  f"{job.results_valid} valid and {job.results_invalid} invalid results"
                  + (f"; {escape(job.error)}" if job.error else ""))
    return {"completed": EXIT_OK, "cancelled": EXIT_JOB_CANCELLED}.get(job.state, EXIT_JOB_FAILED)


def _planned_units(job: Job) -> int | None:
    """A federated job's units appear round by round: its bar counts every planned round's from the start."""
    rounds, shards = job.spec.get("rounds"), job.spec.get("shards")
    if job.kind == "fedavg" and isinstance(rounds, int) and isinstance(shards, int):
        return max(job.units_total, rounds * shards)
    return job.units_total or None


def rounds_table(rounds: Rounds) -> Table:
    table = Table("round", "updates", "samples", "train loss", "eval loss", "eval accuracy",
                  title=f"rounds ({len(rounds.rounds)}/{rounds.rounds_planned})")
    for r in rounds.rounds:
        table.add_row(str(r.round), str(r.updates), str(r.samples), f"{r.train_loss:.4f}", f"{r.eval_loss:.4f}",
                      f"{r.eval_accuracy:.4f}")
    if rounds.training is not None:
        t = rounds.training
        table.add_row(str(t.round), f"{t.units_done}/{t.units_total}", "", "training…", "", "")
    return table


def watch(client: Client, job_id: int, *, interval: float = 1.0, timeout: float | None = None) -> Job:
    """Follow a job with a live bar (units decided of all, valid and invalid results, elapsed, ETA) and, for a
    federated job, a table of its rounds' metrics, until it finishes; return it."""
    progress = Progress(TextColumn("job {task.fields[job]} [bold]{task.fields[state]}[/]"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("units  valid {task.fields[valid]}  invalid {task.fields[invalid]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err)
    bar = progress.add_task("job", total=None, job=job_id, state="…", valid=0, invalid=0)
    with Live(progress, console=err, refresh_per_second=4) as live:
        def show(job: Job) -> None:
            # A job that completed is all done, even one that stopped early (a fedavg target reached).
            total = job.units_done if job.state == "completed" else _planned_units(job)
            progress.update(bar, total=total, completed=job.units_done, state=job.state,
                            valid=job.results_valid, invalid=job.results_invalid)
            live.update(Group(progress, rounds_table(client.rounds(job.id))) if job.kind == "fedavg" else progress)

        return client.wait(job_id, timeout=timeout, poll=interval, max_poll=max(interval, 5.0), on_update=show)
