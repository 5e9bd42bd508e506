"""`idlegrid-agent`: enrol this machine, then run the work loop.

Exit codes: 0 success (or a warm shutdown), 1 a failure or a cold shutdown, 2 a usage problem
(not enrolled, already enrolled, another agent on the same state dir, bad flags).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

import worker_agent
from worker_agent import protocol
from worker_agent.agent import Agent, RunOptions, Summary
from worker_agent.client import AgentClient, AgentError, RetryPolicy
from worker_agent.enroll import AlreadyEnrolled, enroll
from worker_agent.jobfile import FAULT_MODES
from worker_agent.shutdown import ColdShutdown, Shutdown
from worker_agent.state import HOME_ENV, NotEnrolled, StateDir, StateDirBusy, default_state_dir

log = logging.getLogger("worker_agent")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

RUN_EPILOG = """\
--faulty is a SABOTAGE MODE for demos and tests, never for real work. `wrong`: the agent computes
normally, then corrupts the output (class axis rolled by one, noise of scale 0.5, differing per
result); `collude`: the same corruption seeded by the unit's input, so every colluding device sends
identical wrong bytes for a unit; `lazy`: random output without computing. Each is signed and
reported like an honest result, so you can watch the marketplace's verification catch it.
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    state = StateDir(args.state_dir or default_state_dir())
    try:
        return int(args.handler(args, state))
    except (NotEnrolled, AlreadyEnrolled, StateDirBusy) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except AgentError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idlegrid-agent", description="Idlegrid worker agent: contribute this machine's idle CPU.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {worker_agent.__version__}")
    _add_common_options(parser, defaults=True)
    # Accepted after the command too (`run --state-dir X`); SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True)

    enroll_cmd = commands.add_parser("enroll", parents=[common], help="register this machine with a marketplace")
    enroll_cmd.add_argument("--server", required=True, help="marketplace URL, e.g. https://idlegrid.example")
    enroll_cmd.add_argument("--token", required=True, help="one-time enrolment token from your account")
    enroll_cmd.add_argument("--name", default=socket.gethostname(), help="a name for this device (default: hostname)")
    enroll_cmd.add_argument("--force", action="store_true", help="replace an existing enrolment in the state directory")
    enroll_cmd.set_defaults(handler=cmd_enroll)

    run_cmd = commands.add_parser(
        "run", parents=[common], help="lease, compute and report work units",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_cmd.add_argument("--burst", action="store_true", help="exit as soon as the server has no work")
    run_cmd.add_argument("--max-units", type=_positive_int, help="stop after N units were finished (reported or failed)")
    run_cmd.add_argument("--batch", type=_batch, default=4, help=f"units leased per request, 1-{protocol.MAX_LEASE_BATCH} (default 4)")
    run_cmd.add_argument("--poll", type=_positive_float, default=5.0, help="seconds between polls when idle; a longer server retry_after wins (default 5)")
    run_cmd.add_argument("--faulty", choices=FAULT_MODES, help="SABOTAGE MODE for demos/tests only: report deliberately wrong results (see below)")
    run_cmd.add_argument("--max-retries", type=_non_negative_int, default=7, help="retries of a failed request before giving up (default 7)")
    run_cmd.add_argument("--backoff-cap", type=_positive_float, default=30.0, help="longest wait between retries, seconds (default 30)")
    run_cmd.add_argument("--cache-mb", type=_positive_int, default=2048, help="artifact cache size (default 2048)")
    run_cmd.set_defaults(handler=cmd_run)
    return parser


def _add_common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    parser.add_argument(
        "--state-dir", type=Path, default=None if defaults else argparse.SUPPRESS,
        help=f"where the device identity lives (default: ${HOME_ENV} or ~/.idlegrid-agent)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"),
        default="info" if defaults else argparse.SUPPRESS, help="default: info",
    )


def cmd_enroll(args: argparse.Namespace, state: StateDir) -> int:
    with AgentClient(args.server) as client:
        device = enroll(state=state, client=client, server=args.server, token=args.token, name=args.name, force=args.force)
    log.info("enrolled as device %d on %s; state in %s", device.device_id, device.server, state.root)
    print(device.device_id)
    return EXIT_OK


def cmd_run(args: argparse.Namespace, state: StateDir) -> int:
    device, key = state.load_device(), state.load_key()
    options = RunOptions(
        burst=args.burst,
        max_units=args.max_units,
        batch=args.batch,
        poll_seconds=args.poll,
        fault=args.faulty,
        cache_max_bytes=args.cache_mb << 20,
    )
    retry = RetryPolicy(attempts=args.max_retries + 1, cap_seconds=args.backoff_cap)
    if options.fault:
        log.warning("SABOTAGE MODE --faulty %s: results will be deliberately wrong", options.fault)
    with (
        state.exclusive(),
        AgentClient(device.server, device=(device.device_id, device.device_secret), retry=retry) as client,
        Shutdown() as shutdown,
    ):
        agent = Agent(client=client, device=device, key=key, state=state, options=options, shutdown=shutdown)
        log.info("device %d (%s) working for %s", device.device_id, device.name, device.server)
        code = _run_agent(agent)
    print(f"idlegrid-agent: {agent.summary.line()}", file=sys.stderr)
    return code


def _run_agent(agent: Agent) -> int:
    try:
        summary: Summary = agent.run()
    except ColdShutdown:
        return EXIT_FAILURE
    except AgentError as exc:
        log.error("stopping: %s", exc)
        return EXIT_FAILURE
    log.info("stopped after %d finished unit(s)", summary.finished)
    return EXIT_OK


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    # httpx logs every request at INFO; our own lines already say what happened.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _batch(text: str) -> int:
    value = _positive_int(text)
    if value > protocol.MAX_LEASE_BATCH:
        raise argparse.ArgumentTypeError(f"must be at most {protocol.MAX_LEASE_BATCH}, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value
