"""The ``keras-attn`` command line.

    keras-attn plugins                       every registered component, by kind, with its plugin
    keras-attn pattern NAME --length N ...   draw a pattern's mask in the terminal

A pattern's own arguments become options: ``keras-attn pattern local --length 16
--window 3 --causal``. Any pattern, combinations included, can also be given as a
config dict: ``--config '{"name": "union", "config": {...}}'``.
"""

import argparse
import inspect
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _plugins_command(args, out):
    from keras_attn import plugins

    entries = plugins.entries()
    if args.json:
        rows = [
            {
                "kind": e.kind,
                "name": e.name,
                "class": f"{e.cls.__module__}.{e.cls.__qualname__}",
                "plugin": e.plugin,
                "package": e.distribution,
                "version": e.version,
            }
            for e in entries
        ]
        print(json.dumps(rows, indent=2), file=out)
        return 0
    for kind in plugins.KINDS:
        rows = [e for e in entries if e.kind == kind]
        print(f"{kind}s ({len(rows)})", file=out)
        width = max((len(e.name) for e in rows), default=0)
        for e in rows:
            package = f"{e.distribution} {e.version}" if e.distribution else "in-process"
            print(f"  {e.name:<{width}}  {package:<24} plugin {e.plugin}", file=out)
    return 0


def _pattern_options(cls):
    """argparse options for a pattern class's constructor arguments."""
    options = []
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        options.append(param)
    return options


def _parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _build_pattern(args, extra, parser):
    from keras_attn import plugins

    if args.config:
        try:
            spec = json.loads(args.config)
        except json.JSONDecodeError as e:
            parser.error(f"--config must be JSON: {e}. Received: --config={args.config!r}")
        if extra:
            parser.error(f"unrecognized arguments with --config: {' '.join(extra)}")
        return plugins.resolve("pattern", spec)
    if args.name is None:
        parser.error("give a pattern NAME or --config JSON")
    cls = plugins.get("pattern", args.name)
    sub = argparse.ArgumentParser(prog=f"keras-attn pattern {args.name}", add_help=False)
    for param in _pattern_options(cls):
        flag = "--" + param.name.replace("_", "-")
        if param.default is False:
            sub.add_argument(flag, dest=param.name, action="store_true")
        else:
            sub.add_argument(
                flag,
                dest=param.name,
                type=_parse_value,
                default=param.default,
                required=param.default is inspect.Parameter.empty,
            )
    try:
        kwargs = vars(sub.parse_args(extra))
    except SystemExit:
        names = ", ".join("--" + p.name.replace("_", "-") for p in _pattern_options(cls))
        parser.error(f"pattern {args.name!r} takes: {names or 'no options'}")
    return cls(**kwargs)


def _pattern_command(args, extra, parser, out):
    from keras_attn import viz

    if args.length <= 0:
        parser.error(f"--length must be a positive integer. Received: --length={args.length}")
    pattern = _build_pattern(args, extra, parser)
    query_length = args.query_length or args.length
    mask = viz.pattern_mask(pattern, query_length, args.length, query_offset=args.offset)
    print(repr(pattern), file=out)
    allowed, blocked = ("#", ".") if args.ascii else (viz.ALLOWED, viz.BLOCKED)
    print(viz.render_mask(mask, allowed, blocked, query_offset=args.offset), file=out)
    return 0


def make_parser():
    parser = argparse.ArgumentParser(
        prog="keras-attn", description="keras_attn: pluggable attention layers for Keras 3."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plugins", help="list registered components and their plugins")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = commands.add_parser(
        "pattern",
        help="draw a pattern's mask",
        description="Draw a pattern's mask: one line per query, one character per key. "
        "The pattern's own arguments are options, e.g. --window 3 --causal.",
    )
    p.add_argument("name", nargs="?", help="registered pattern name, e.g. local")
    p.add_argument("--length", type=int, required=True, help="number of keys (and queries)")
    p.add_argument("--query-length", type=int, help="number of queries, if not --length")
    p.add_argument("--offset", type=int, default=0, help="absolute position of the first query")
    p.add_argument("--config", help='pattern as JSON, e.g. {"name": "local", "config": {...}}')
    p.add_argument("--ascii", action="store_true", help="draw with # and . only")
    return parser


def main(argv=None, out=None):
    out = sys.stdout if out is None else out
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    from keras_attn.errors import PluginError

    try:
        if args.command == "plugins":
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            return _plugins_command(args, out)
        return _pattern_command(args, extra, parser, out)
    except (PluginError, ValueError, TypeError) as e:
        print(f"keras-attn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
