"""`sfam`: explain one pair, run an audit, run the demo, build a report, compare two runs, render any pair of a run.

Every command ends a user mistake (config, manifest, storage, credentials, model, layers,
image) with one line, `error: <what>: <why>`, and exit status 2; an audit whose result is
not acceptable (too many bad rows) with `audit failed: <why>` and exit status 1; a finished
run that broke a quality gate with `gates failed: <which, by how much>` and exit status 3.
`--debug` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import select
import sys
import traceback
from dataclasses import dataclass
from typing import NoReturn, get_args

import yaml

from pipeline.config import (
    MAX_IMAGE_PIXELS,
    RUN_ID_PATTERN,
    RUN_ID_RULE,
    ConfigError,
    FinishedRunSettings,
    PairSettings,
    load_config,
    load_yaml,
    model_section,
    one_line,
    parse_override,
    validated,
)
from pipeline.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    PipelineError,
    Terminated,
    UserError,
    as_sent,
)
from pipeline.gates import GatesFailed
from pipeline.io.iceberg_store import TableConfig
from pipeline.io.storage import StorageOptions, read_bytes, redact_uri, resolve_uri, write_bytes
from pipeline.models.spec import LayoutName, Metric, ModelSpec, Weighting
from pipeline.run_history import recorded_table
from pipeline.stopping import shut_down_ray, stop_signals

AUDIT_COMMANDS = ("audit", "demo")  # the commands that run an audit's attempt


def _model_spec(text: str) -> ModelSpec:
    """`--model resnet18` or an inline mapping: `--model '{arch: resnet18, embedding_dim: 64}'`."""
    try:
        value = load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--model {text!r}: not YAML: {one_line(error)}") from error
    return validated(ModelSpec, model_section(value if isinstance(value, dict) else text), f"--model {text!r}")


def _finite_number(text: str) -> float:
    """A float flag that must be a number: argparse turns the refusal into a one-line usage error, exit 2."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _run_id(text: str) -> str:
    """A run id as the job names runs; a path in its place (`../x`) would read or write outside the run's folders."""
    if not RUN_ID_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: {RUN_ID_RULE}")
    return text


def _compared_run_id(text: str) -> str:
    """_run_id for `sfam compare`'s RUN_A and RUN_B, where argparse gives RUN_A the audit's folder when
    a run id is missing or an option comes between the folder and the run ids."""
    if "/" in text:  # never in a run id
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a run id ({RUN_ID_RULE}): sfam compare takes "
                                         "[OUTPUT] RUN_A RUN_B, two run ids after the audit's folder, options after them")
    return _run_id(text)


def _refuse_ignored(args: argparse.Namespace) -> None:
    """--set only changes a --config; with --config, its storage options replace --endpoint-url."""
    if args.config and args.endpoint_url:
        raise ConfigError("--endpoint-url: with --config, set storage_options.endpoint_url in the config "
                          "(or --set storage_options.endpoint_url=URL)")
    if not args.config and args.overrides:
        raise ConfigError(f"--set {args.overrides[0]!r}: --set changes the file given with --config, and there is none")


def _check_output(output: str, flag: str, example: str, stdout: bool = False) -> None:
    """The file a command writes, checked before any work: not a folder, named with `example`'s
    suffix (what is written), and `-` (the standard output) only where the command writes there."""
    suffix = os.path.splitext(example)[1]
    if output == "-" and not stdout:
        raise ConfigError(f"{flag} -: this command writes a {suffix} file, not to the standard output; name it, "
                          f"e.g. {example}")
    if output == "-":
        return
    if "://" not in output and os.path.isdir(output):
        raise ConfigError(f"{flag} {output}: is a folder; name the {suffix} file to write, e.g. {os.path.join(output, example)}")
    if not output.lower().endswith(suffix):
        raise ConfigError(f"{flag} {output}: the file written is a {suffix} file; name it so, e.g. {example}")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def explain_command(args: argparse.Namespace) -> int:
    _refuse_ignored(args)
    _check_output(args.output, "-o", "pair.png")
    if args.config:
        config = load_config(args.config, args.overrides, PairSettings)
        spec, options, max_pixels = config.model, config.storage_options, config.max_image_pixels
    else:
        spec, options, max_pixels = _model_spec(args.model), _endpoint_options(args.endpoint_url), MAX_IMAGE_PIXELS
    changes = {"metric": args.metric, "target_layer": args.target_layer, "embedding_layer": args.embedding_layer,
               "weighting": args.weighting, "feature_layout": args.feature_layout, "prefix_tokens": args.prefix_tokens}
    spec = validated(ModelSpec, {**spec.model_dump(), **{k: v for k, v in changes.items() if v is not None}},
                     "sfam explain")
    # torch loads only for the commands that need it, after the config's and the images' mistakes are told (seconds)
    # a file:/// URI is read as the job reads it from a manifest: its percent-escapes decoded
    locations = [resolve_uri(uri, ".") for uri in (args.query, args.reference)]
    query_image, reference_image = ((uri, read_bytes(uri, options)) for uri in locations)
    import pyarrow as pa

    from pipeline.models.loading import random_weights_warning
    from pipeline.pair import explain_pair
    from pipeline.quality import empty_pair_maps_warning, one_cell_maps_warning, residual_warning

    explanation = explain_pair(query_image, reference_image, spec, options, max_pixels)
    write_bytes(args.output, explanation.png, options)
    random_weights = random_weights_warning(spec)  # once the model is known to build: not before an error
    if random_weights:
        _warn(random_weights)
    print(f"target layer: {explanation.target_layer} ({spec.weighting} map)")
    print(f"{spec.metric} similarity: {_score_text(explanation.similarity, sign='-')}")
    print("top channels by CIS (channel: query CIS, reference CIS):")
    for channel, query, reference in explanation.top_channels:
        print(f"  {channel:5d}: {_score_text(query)} {_score_text(reference)}")
    print(f"residual: query {_score_text(explanation.residual_query)}, "
          f"reference {_score_text(explanation.residual_reference)}")
    warnings = (residual_warning([explanation.similarity], [explanation.residual_query], [explanation.residual_reference],
                                 spec.metric), empty_pair_maps_warning(explanation.empty_maps),
                one_cell_maps_warning(pa.array([explanation.map_shape])))
    for warning in warnings:
        if warning:
            _warn(warning)
    print(f"wrote {args.output}")
    return EXIT_OK


def _score_text(value: float, sign: str = "+") -> str:
    """+0.0930; a nonzero value that four decimals would show as 0.0000 (a random model's) as +1.23e-06.
    sign: "+" signs every value, "-" the negative ones only."""
    return f"{value:{sign}.4f}" if abs(value) >= 5e-5 or value == 0 else f"{value:{sign}.2e}"


def audit_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from pipeline.distributed.job import run_audit  # Ray loads only for the commands that need it

    try:
        summary = run_audit(config)
    except GatesFailed as failed:  # committed: what it wrote, then (on stderr) the gates it broke
        print("\n".join(failed.summary))
        raise
    print("\n".join(summary.lines()))
    return EXIT_OK


def demo_command(args: argparse.Namespace) -> int:
    from pipeline.demo.audit import GALLERY_SIZE
    from pipeline.demo.job import run_demo

    if args.queries < 1:
        raise ConfigError(f"--queries {args.queries}: at least 1")
    if not 1 <= args.top_k <= GALLERY_SIZE:
        raise ConfigError(f"--top-k {args.top_k}: from 1 to {GALLERY_SIZE} (the demo gallery's images)")
    run_demo(args.output, queries=args.queries, top_k=args.top_k)
    return EXIT_OK


@dataclass(frozen=True)
class _Audit:
    """Where a finished audit lives: its output root, storage options and table format."""

    output: str
    options: StorageOptions
    table: TableConfig | None


def _audit(args: argparse.Namespace, run_id: str) -> _Audit:
    """From --config, or from OUTPUT and --endpoint-url, in the table that `run_id`'s record names."""
    _refuse_ignored(args)
    for override in args.overrides:  # the rest was fixed when the run ran: changing it would change nothing
        if parse_override(override)[0][0] not in FinishedRunSettings.model_fields:
            raise ConfigError(f"--set {override!r}: sfam {args.command} reads a finished run as it was written; "
                              f"only {', '.join(FinishedRunSettings.model_fields)} can be set here")
    if args.config:
        config = load_config(args.config, args.overrides, FinishedRunSettings)
        return _Audit(args.output_root or config.output, config.storage_options, config.table)
    if not args.output_root:
        raise ConfigError(f"sfam {args.command} needs the audit's OUTPUT root or --config")
    output = validated(FinishedRunSettings, {"output": args.output_root}, f"sfam {args.command}").output
    options = _endpoint_options(args.endpoint_url)
    return _Audit(output, options, recorded_table(output, run_id, options))


def _endpoint_options(endpoint_url: str | None) -> StorageOptions:
    """The storage options of --endpoint-url (commands without --config), checked as the config's are."""
    return validated(StorageOptions, {"endpoint_url": endpoint_url}, "--endpoint-url")


def report_command(args: argparse.Namespace) -> int:
    from pipeline.reporting import write_report

    audit = _audit(args, args.run_id)
    if args.out is not None:
        _check_output(args.out, "-o", "report.html")
    path = write_report(audit.output, args.run_id, audit.options, args.out, audit.table)
    print(f"wrote {path}")
    return EXIT_OK


def compare_command(args: argparse.Namespace) -> int:
    from pipeline.comparison import compare_runs, write_comparison

    if args.run_a == args.run_b:  # the library compares a run with itself (nothing moves); a user meant two runs
        raise UserError(f"compare: run {args.run_a!r} with itself; name an earlier and a later run")
    audit = _audit(args, args.run_b)
    comparison = compare_runs(audit.output, args.run_a, args.run_b, audit.options, args.threshold, audit.table)
    written = write_comparison(comparison, audit.output, audit.options).values()  # before printing: `| head` may stop it
    print("\n".join([*comparison.lines(), *(f"wrote {path}" for path in written)]))
    return EXIT_OK


def render_command(args: argparse.Namespace) -> int:
    from pipeline.overlays import render_pair_of_run

    audit = _audit(args, args.run_id)
    _check_output(args.out, "-o", "pair.png", stdout=True)
    png = render_pair_of_run(audit.output, args.run_id, args.pair_id, audit.options, audit.table)
    if args.out == "-":
        sys.stdout.buffer.write(png)
    else:
        write_bytes(args.out, png, audit.options)
        print(f"wrote {args.out}")
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """A command line mistake is one line, as every other user mistake: what is wrong, and where the usage is."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (usage: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sfam", description="Similar Feature Activation Maps for metric-learning models")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    audit_root = argparse.ArgumentParser(add_help=False)  # which audit, and how to reach it
    audit_root.add_argument("output_root", metavar="OUTPUT", nargs="?", help="the audit's output root (default: the config's)")
    audit_root.add_argument("--config", help="job config YAML: its output and storage options are used")
    _add_overrides(audit_root, "table.format=iceberg")
    audit_root.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URIs (without --config)")
    finished_run = argparse.ArgumentParser(add_help=False, parents=[audit_root])  # which run of that audit
    finished_run.add_argument("--run-id", required=True, type=_run_id, help="the run (its run_id)")

    explain = commands.add_parser("explain", parents=[common], help="explain one image pair and write its overlay PNG")
    explain.add_argument("query", help="query image (path or fsspec URI)")
    explain.add_argument("reference", help="reference image (path or fsspec URI)")
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="torchvision arch, package.module:factory, or an inline YAML ModelSpec")
    source.add_argument("--config", help="job config YAML; its model section and storage options are used")
    _add_overrides(explain, "model.metric=dot")
    explain.add_argument("-o", "--output", required=True, help="PNG to write (path or URI)")
    explain.add_argument("--metric", choices=get_args(Metric))
    explain.add_argument("--weighting", choices=get_args(Weighting), help="map weighting (default: the spec's, cis)")
    explain.add_argument("--target-layer")
    explain.add_argument("--embedding-layer")
    explain.add_argument("--feature-layout", choices=get_args(LayoutName),
                         help="how the target layer holds its grid (default: auto, detected)")
    explain.add_argument("--prefix-tokens", type=int, help="class / register tokens before the patch tokens")
    explain.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    explain.set_defaults(handler=explain_command)

    audit = commands.add_parser("audit", parents=[common], help="run the audit job (same as python -m jobs.audit)")
    audit.add_argument("--config", required=True, help="job config YAML (keys and defaults: README, Configuration)")
    _add_overrides(audit, "model.metric=dot")
    audit.set_defaults(handler=audit_command)

    demo = commands.add_parser("demo", parents=[common], help="build the demo data and run the audit job on it")
    demo.add_argument("--output", default="demo-output", help="folder for the demo's data and audit (default: %(default)s)")
    demo.add_argument("--queries", type=int, default=30, help="query images (default: %(default)s)")
    demo.add_argument("--top-k", type=int, default=10, help="results per query, at most 80 (default: %(default)s)")
    demo.set_defaults(handler=demo_command)

    report = commands.add_parser("report", parents=[common, finished_run], help="write a run's static HTML report")
    report.add_argument("-o", "--out", help="HTML file (default OUTPUT/reports/RUN_ID.html)")
    report.set_defaults(handler=report_command)

    compare = commands.add_parser("compare", parents=[common, audit_root],
                                  help="compare two finished runs pair by pair; writes OUTPUT/comparisons/A/B/")
    compare.add_argument("run_a", metavar="RUN_A", type=_compared_run_id, help="the earlier run")
    compare.add_argument("run_b", metavar="RUN_B", type=_compared_run_id, help="the later run")
    compare.add_argument("--threshold", type=_finite_number,
                         help="false match: label 0 and similarity at or above this (the metric's units; default: "
                              "RUN_B's gates.false_match_similarity)")
    compare.set_defaults(handler=compare_command)

    render = commands.add_parser("render", parents=[common, finished_run],
                                 help="draw the overlay of any pair of a finished run, from the result table")
    render.add_argument("--pair-id", required=True, help="the pair (its pair_id in the manifest)")
    render.add_argument("-o", "--out", required=True, help="PNG to write (path or URI), or - for the standard output")
    render.set_defaults(handler=render_command)
    return parser


def _add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    """Repeatable --set KEY=VALUE: changes to the values of --config."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a value of --config, e.g. --set {example} (repeatable)")


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status (errors.py says which status means what)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # torch sets its loggers' levels at the end of its import: one cut short by Ctrl-C left them at INFO, and
    # torch's exit hooks wrote their statistics under the command's last line
    logging.getLogger("torch").setLevel(logging.WARNING)
    logging.getLogger("aiobotocore.credentials").setLevel(logging.WARNING)  # "Found credentials in ...", per client
    with stop_signals():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        status = args.handler(args)
        sys.stdout.flush()  # here, not at exit: a reader that has gone (`| head`) is seen below
        return status
    except PipelineError as error:
        if args.debug:
            _print_traceback()
        print(f"{error.prefix}: {redact_uri(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: an audit's attempt is recorded as failed on the way out
        if args.debug:
            _print_traceback()
        terminated = isinstance(as_sent(stop), Terminated)
        lead = "terminated: SIGTERM stopped it; " if terminated else "interrupted: "
        line = f"{lead}an audit's attempt, once started, is recorded as failed; a committed run stays as it was"
        try:
            shut_down_ray()  # first: what Ray's processes print as they stop comes before the command's last line
        finally:
            print(line if args.command in AUDIT_COMMANDS else lead.rstrip(": ;"), file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        # whoever read the output stopped early (`| head`): quietly, as a SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return EXIT_BROKEN_PIPE


def _print_traceback() -> None:
    """--debug: the traceback of the error being handled, credentials in URIs redacted as in its line."""
    print(redact_uri(traceback.format_exc()), end="", file=sys.stderr)


def _stdout_gone() -> bool:
    """Whether nobody reads the standard output any more (the write end of a pipe whose reader has gone)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # no file descriptor to poll
        return False


if __name__ == "__main__":
    sys.exit(main())
