"""`sfam`: explain one pair, run an audit, run the demo, build a report."""

from __future__ import annotations

import argparse
import sys

import yaml

from pipeline.config import ConfigError, add_config_arguments, load_config
from pipeline.io.storage import StorageError, StorageOptions
from pipeline.models.spec import ModelSpec


def _model_spec(text: str) -> ModelSpec:
    """`--model resnet18` or an inline mapping: `--model '{arch: resnet18, embedding_dim: 64}'`."""
    value = yaml.safe_load(text)
    return ModelSpec.model_validate(value if isinstance(value, dict) else {"arch": text})


def explain_command(args: argparse.Namespace) -> int:
    from pipeline.pair import explain_pair  # torch and torchvision load only for the commands that need them

    if args.config:
        config = load_config(args.config, args.overrides)
        spec, options = config.model, config.storage_options
    else:
        spec, options = _model_spec(args.model), StorageOptions(endpoint_url=args.endpoint_url)
    changes = {"metric": args.metric, "target_layer": args.target_layer, "embedding_layer": args.embedding_layer}
    spec = spec.model_copy(update={k: v for k, v in changes.items() if v is not None})
    explanation = explain_pair(args.query, args.reference, spec, options, weighting=args.weighting, output=args.output)
    print(f"{spec.metric} similarity: {explanation.similarity:.4f}")
    print("top channels by CIS (channel: query CIS, reference CIS):")
    for channel, query, reference in explanation.top_channels:
        print(f"  {channel:5d}: {query:+.4f} {reference:+.4f}")
    print(f"residual: query {explanation.residual_query:+.4f}, reference {explanation.residual_reference:+.4f}")
    print(f"wrote {args.output}")
    return 0


def audit_command(args: argparse.Namespace) -> int:
    from jobs.audit import run

    return run(args)


def demo_command(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(args.output, queries=args.queries, top_k=args.top_k)


def report_command(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    path = write_report(args.output_root, args.run_id, StorageOptions(endpoint_url=args.endpoint_url), args.out)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfam", description="Similar Feature Activation Maps for metric-learning models")
    commands = parser.add_subparsers(dest="command", required=True)

    explain = commands.add_parser("explain", help="explain one image pair and write its overlay PNG")
    explain.add_argument("query", help="query image (path or fsspec URI)")
    explain.add_argument("reference", help="reference image (path or fsspec URI)")
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="torchvision arch, package.module:factory, or an inline YAML ModelSpec")
    source.add_argument("--config", help="job config YAML; its model section is used")
    explain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    explain.add_argument("-o", "--output", required=True, help="PNG to write (path or URI)")
    explain.add_argument("--metric", choices=["cosine", "dot", "euclidean"])
    explain.add_argument("--weighting", choices=["cis", "partner"], default="cis")
    explain.add_argument("--target-layer")
    explain.add_argument("--embedding-layer")
    explain.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    explain.set_defaults(handler=explain_command)

    audit = commands.add_parser("audit", help="run the audit job (same as python -m jobs.audit)")
    add_config_arguments(audit)
    audit.set_defaults(handler=audit_command)

    demo = commands.add_parser("demo", help="build the demo data and run the audit job on it")
    demo.add_argument("--output", default="demo-output")
    demo.add_argument("--queries", type=int, default=30)
    demo.add_argument("--top-k", type=int, default=10)
    demo.set_defaults(handler=demo_command)

    report = commands.add_parser("report", help="write a run's static HTML report")
    report.add_argument("output_root", metavar="OUTPUT", help="the audit's output root")
    report.add_argument("--run-id", required=True)
    report.add_argument("-o", "--out", help="HTML file (default OUTPUT/reports/RUN_ID.html)")
    report.add_argument("--endpoint-url")
    report.set_defaults(handler=report_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.explain import ExplanationError
    from pipeline.io.images import ImageDecodeError
    from pipeline.models.loading import ModelLoadError

    try:
        return args.handler(args)
    except (ConfigError, StorageError, ImageDecodeError, ModelLoadError, ExplanationError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
