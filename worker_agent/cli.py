"""`idlegrid-agent`: enrol this machine, then run the work loop.

Exit codes: 0 success (or a warm shutdown), 1 a failure or a cold shutdown, 2 a usage problem
(not enrolled, already enrolled, another agent on the same state dir, bad flags).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path

import worker_agent
from worker_agent import control, protocol, service, wallet
from worker_agent.agent import Agent, RunOptions, Summary
from worker_agent.client import AgentClient, AgentError, RetryPolicy
from worker_agent.enroll import AlreadyEnrolled, enroll
from worker_agent.jobfile import FAULT_MODES
from worker_agent.policy.config import KEYS, PARSERS, Policy, PolicyError, describe, env_name, flag_name, load_policy
from worker_agent.policy.idle import IdleSourceUnavailable
from worker_agent.shutdown import ColdShutdown, Shutdown
from worker_agent.state import HOME_ENV, NotEnrolled, StateDir, StateDirBusy, default_state_dir

log = logging.getLogger("worker_agent")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

RUN_EPILOG = """\
--faulty is a SABOTAGE MODE for demos and tests, never for real work. `wrong`: the agent computes
normally, then corrupts the output (class axis rolled by one, noise of scale 0.5, differing per
result); `collude`: the same corruption seeded by the unit's input, so every colluding device sends
identical wrong bytes for a unit; `lazy`: random output without computing (fedavg: the global
weights sent back untrained); `poison` (fedavg only): the training update sign-flipped and scaled
by 10. Each is signed and reported like an honest result, so you can watch the marketplace's
verification catch it.
"""


POLICY_EPILOG = """\
Each key is read from its flag, else $IDLEGRID_AGENT_<KEY>, else config.toml in the state directory (flat
TOML keys, e.g. `idle_minutes = 5`), else its default. See worker_agent/README.md, "Contributor policy".
"""


CLAIM_EPILOG = f"""\
The marketplace is asked with this device's credentials, or with your API token if ${wallet.API_TOKEN_ENV}
is set. The key is read from --key-file or ${wallet.WALLET_KEY_ENV}, never from the command line, and
never printed. Anyone's key can send the claim: the tokens always go to the payout address. Prints one
JSON object: tx_hash (null when there was nothing new to claim), account, amount received, cumulative.
"""


SIGN_EPILOG = f"""\
Signs the text exactly as given (one trailing line break dropped) with personal_sign (EIP-191), as a
browser wallet would; the marketplace's payout page and GET /api/v1/wallet/challenge/ give the message.
The key is read from --key-file or ${wallet.WALLET_KEY_ENV}, never from the command line, and never
printed. Needs no enrolment. Prints one JSON object: address, signature.
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
    run_cmd.add_argument("--wait", type=_wait, default=protocol.MAX_LEASE_WAIT_SECONDS,
                         help=f"when idle, seconds the server may hold a lease request until work comes (the long poll), "
                              f"0-{protocol.MAX_LEASE_WAIT_SECONDS}; 0 polls every --poll seconds (default "
                              f"{protocol.MAX_LEASE_WAIT_SECONDS})")
    run_cmd.add_argument("--faulty", choices=FAULT_MODES, help="SABOTAGE MODE for demos/tests only: report deliberately wrong results (see below)")
    run_cmd.add_argument("--max-retries", type=_non_negative_int, default=7, help="retries of a failed request before giving up (default 7)")
    run_cmd.add_argument("--backoff-cap", type=_positive_float, default=30.0, help="longest wait between retries, seconds (default 30)")
    _add_policy_options(run_cmd)
    run_cmd.add_argument("--checkpoint-seconds", type=_positive_float, default=60.0,
                         help="how often a running unit checkpoints, seconds (default 60; and always at a warm stop)")
    run_cmd.set_defaults(handler=cmd_run)

    config_cmd = commands.add_parser(
        "config", parents=[common], help="print the policy in force: each key, its value and where it came from",
        epilog=POLICY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_cmd.add_argument("--json", action="store_true", help="one JSON object: {key: {value, source}}")
    _add_policy_options(config_cmd)
    config_cmd.set_defaults(handler=cmd_config)

    claim_cmd = commands.add_parser(
        "claim", parents=[common], help="claim your payouts: fetch your latest proof and send the claim on chain",
        epilog=CLAIM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    claim_cmd.add_argument("--rpc-url", required=True, help="JSON-RPC URL of the chain the payout contract is on")
    claim_cmd.add_argument("--key-file", type=Path, help=f"file holding the private key that signs and pays the gas (default: ${wallet.WALLET_KEY_ENV})")
    claim_cmd.add_argument("--address", help="which of your payout addresses (default: the active one)")
    claim_cmd.add_argument("--server", help="marketplace URL (default: the one this device enrolled with)")
    claim_cmd.set_defaults(handler=cmd_claim)

    sign_cmd = commands.add_parser(
        "sign-message", parents=[common], help="sign a message with your payout key (EIP-191), to link the address",
        epilog=SIGN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sign_cmd.add_argument("--key-file", type=Path, help=f"file holding the private key (default: ${wallet.WALLET_KEY_ENV})")
    sign_cmd.add_argument("--message-file", type=Path, help="file holding the message (default: standard input)")
    sign_cmd.set_defaults(handler=cmd_sign_message)

    status_cmd = commands.add_parser("status", parents=[common], help="what the agent is doing, and what it earned")
    status_cmd.add_argument("--json", action="store_true", help="print one JSON object instead of the screen")
    status_cmd.set_defaults(handler=cmd_status)

    pause_cmd = commands.add_parser("pause", parents=[common], help="pause the running agent (its unit stops where it is)")
    pause_cmd.add_argument("--for", dest="duration", type=_duration, help="e.g. 30m, 2h, 1h30m (default: until `resume`)")
    pause_cmd.add_argument("--reason", default="", help="a few words shown by `status` (e.g. \"a video call\")")
    pause_cmd.set_defaults(handler=cmd_pause)

    resume_cmd = commands.add_parser("resume", parents=[common], help="resume a paused agent")
    resume_cmd.set_defaults(handler=cmd_resume)

    service_cmd = commands.add_parser("service", parents=[common], help="start the agent at login (systemd, launchd)")
    service_actions = service_cmd.add_subparsers(dest="action", required=True)
    install_cmd = service_actions.add_parser(
        "install", parents=[common], help="write a systemd user unit (Linux) or a launchd agent (macOS); Windows: print a schtasks command",
    )
    install_cmd.add_argument("--print", dest="print_only", action="store_true", help="print the file, write nothing")
    install_cmd.add_argument("--uninstall", action="store_true", help="remove the file written before")
    install_cmd.set_defaults(handler=cmd_service_install)
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


def _add_policy_options(parser: argparse.ArgumentParser) -> None:
    """One flag per policy key (--idle-minutes ...); None = not given, so env, file and default apply.
    Values are checked by the policy loader, which names the flag in its errors."""
    group = parser.add_argument_group("policy (over $IDLEGRID_AGENT_<KEY>, over config.toml in the state dir)")
    for key in KEYS:
        if PARSERS[key] is _BOOLEAN:
            group.add_argument(flag_name(key), dest=key, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(${env_name(key)})")
        else:
            group.add_argument(flag_name(key), dest=key, default=None, metavar=key.split("_")[-1].upper(),
                               help=f"default {_default_text(key)} (${env_name(key)})")


def _default_text(key: str) -> str:
    value = getattr(Policy(), key)
    return json.dumps(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def _policy(args: argparse.Namespace, state: StateDir) -> Policy:
    return load_policy(state.root, flags={key: getattr(args, key) for key in KEYS})


def cmd_config(args: argparse.Namespace, state: StateDir) -> int:
    try:
        policy = _policy(args, state)
    except PolicyError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({key: {"value": getattr(policy, key), "source": policy.sources[key]} for key in KEYS}))
    else:
        print("\n".join(describe(policy)))
    return EXIT_OK


def cmd_enroll(args: argparse.Namespace, state: StateDir) -> int:
    with AgentClient(args.server) as client:
        device = enroll(state=state, client=client, server=args.server, token=args.token, name=args.name, force=args.force)
    log.info("enrolled as device %d on %s; state in %s", device.device_id, device.server, state.root)
    print(device.device_id)
    return EXIT_OK


def cmd_run(args: argparse.Namespace, state: StateDir) -> int:
    device, key = state.load_device(), state.load_key()
    try:
        policy = _policy(args, state)
    except PolicyError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    options = RunOptions(
        burst=args.burst,
        max_units=args.max_units,
        batch=args.batch,
        poll_seconds=args.poll,
        wait_seconds=args.wait,
        fault=args.faulty,
        cache_max_bytes=policy.cache_mb << 20,
        threads=policy.cores,
        checkpoint_seconds=args.checkpoint_seconds,
    )
    retry = RetryPolicy(attempts=args.max_retries + 1, cap_seconds=args.backoff_cap)
    if options.fault:
        log.warning("SABOTAGE MODE --faulty %s: results will be deliberately wrong", options.fault)
    with (
        state.exclusive(),
        AgentClient(device.server, device=(device.device_id, device.device_secret), retry=retry) as client,
        Shutdown() as shutdown,
    ):
        try:
            agent = Agent(client=client, device=device, key=key, state=state, options=options, shutdown=shutdown,
                          policy=policy)
        except IdleSourceUnavailable as exc:
            log.error("policy key idle_source (from %s): %s", policy.sources["idle_source"], exc)
            return EXIT_USAGE
        log.info("device %d (%s) working for %s", device.device_id, device.name, device.server)
        code = _run_agent(agent)
    print(f"idlegrid-agent: {agent.summary.line()}", file=sys.stderr)
    return code


def cmd_claim(args: argparse.Namespace, state: StateDir) -> int:
    token = os.environ.get(wallet.API_TOKEN_ENV)
    if token:
        server = args.server or state.load_device().server
        authorization = wallet.token_authorization(token)
    else:
        device = state.load_device()
        server = args.server or device.server
        authorization = wallet.device_authorization(device.device_id, device.device_secret)
    try:
        key = wallet.wallet_key_load(key_file=args.key_file)
        payout = wallet.proof_fetch(server=server, authorization=authorization, address=args.address)
        log.info("epoch %d: %s may claim up to %d in total from %s", payout.epoch, payout.account, payout.cumulative,
                 payout.contract)
        outcome = wallet.claim_send(rpc_url=args.rpc_url, payout=payout, key=key)
    except wallet.WalletError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    if outcome.tx_hash is None:
        log.info("nothing to claim: %s already received %d", outcome.account, outcome.cumulative)
    else:
        log.info("claimed %d for %s in transaction %s", outcome.amount, outcome.account, outcome.tx_hash)
    print(json.dumps({"tx_hash": outcome.tx_hash, "account": outcome.account, "amount": str(outcome.amount),
                      "cumulative": str(outcome.cumulative), "epoch": outcome.epoch, "gas_used": outcome.gas_used}))
    return EXIT_OK


def cmd_sign_message(args: argparse.Namespace, state: StateDir) -> int:
    try:
        key = wallet.wallet_key_load(key_file=args.key_file)
        try:
            raw = args.message_file.read_bytes() if args.message_file else sys.stdin.buffer.read(wallet.MAX_MESSAGE_BYTES + 1)
        except OSError as exc:
            raise wallet.WalletError(f"cannot read the message file {args.message_file}: {exc.strerror}") from None
        signed = wallet.message_sign(message=wallet.message_text(raw), key=key)
    except wallet.WalletError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    print(json.dumps({"address": signed.address, "signature": signed.signature}))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, state: StateDir) -> int:
    from worker_agent.status_screen import render, status_gather

    status = status_gather(state)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        render(status)
    return EXIT_OK


def cmd_pause(args: argparse.Namespace, state: StateDir) -> int:
    try:
        answer = control.ControlClient(control.socket_path(state.root)).pause(args.duration, args.reason)
    except control.ControlError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    until = answer.get("paused_until")
    print(f"paused until {_local_time(until)}" if until else "paused until `idlegrid-agent resume`")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace, state: StateDir) -> int:
    try:
        answer = control.ControlClient(control.socket_path(state.root)).resume()
    except control.ControlError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    print("still paused: " + ", ".join(answer.get("pause_reasons") or []) if answer.get("paused") else "resumed")
    return EXIT_OK


def cmd_service_install(args: argparse.Namespace, state: StateDir) -> int:
    try:
        unit = service.service_file(state_dir=state.root, home=Path.home())
        if args.print_only or unit.path is None:
            commands = unit.uninstall_commands if args.uninstall else unit.next_commands
            where = f"# {unit.path}" if unit.path is not None else "# run in a command prompt:"
            print(f"{where}\n{unit.content}\n# then:\n" + "\n".join(commands))
            return EXIT_OK
        if args.uninstall:
            print("\n".join(unit.uninstall_commands) + "   # first, to stop it")
            removed = service.uninstall(unit)
            print(f"removed {unit.path}" if removed else f"nothing to remove: {unit.path} does not exist")
            return EXIT_OK
        service.install(unit)
    except service.ServiceError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    print(f"wrote {unit.path}\nnext:\n  " + "\n  ".join(unit.next_commands))
    return EXIT_OK


def _local_time(moment: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(moment))


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


_BOOLEAN = PARSERS["run_on_battery"]


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


def _wait(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds, got {text!r}") from None
    if not 0 <= value <= protocol.MAX_LEASE_WAIT_SECONDS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {protocol.MAX_LEASE_WAIT_SECONDS}, got {value}")
    return value


DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def _duration(text: str) -> float:
    """'30m', '2h', '1h30m', '45s', '1d' -> seconds."""
    match = DURATION.fullmatch(text.strip().lower())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 2h, 1h30m, 45s, 1d)")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    total = float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    if not 0 < total <= control.MAX_PAUSE_SECONDS:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {control.MAX_PAUSE_SECONDS / 86400:g} days, got {text!r}")
    return total


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value
