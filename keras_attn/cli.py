"""The ``keras-attn`` command line.

    keras-attn plugins                       every registered component, by kind, with its plugin
    keras-attn pattern NAME --length N ...   draw a pattern's mask in the terminal
    keras-attn pattern NAME --help           the pattern's own arguments

A pattern's own arguments become options: ``keras-attn pattern local --length 16
--window 3 --causal``. Any pattern, combinations included, can instead be given as a
config dict: ``--config '{"name": "union", "config": {...}}'`` (a NAME and --config
together is an error).

``keras-attn --help`` and ``--version`` answer without importing Keras or a backend:
this module imports only the standard library at the top, and each command imports
what it needs when it runs.
"""

import argparse
import inspect
import json
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

COMMANDS = {
    "plugins": "list registered components and their plugins",
    "pattern": "draw a pattern's mask (NAME --help lists its arguments)",
}


def _version():
    from keras_attn import __version__

    return __version__


def make_parser():
    """The top-level parser: ``--help``, ``--version`` and the command's name.

    Each command parses the rest of the line with a parser of its own, so that
    ``keras-attn pattern NAME --help`` can list the arguments of pattern NAME.
    """
    parser = argparse.ArgumentParser(
        prog="keras-attn", description="keras_attn: pluggable attention layers for Keras 3."
    )
    parser.add_argument("--version", action="version", version=f"keras-attn {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


# -- plugins --------------------------------------------------------------------------


def _plugins_parser():
    parser = argparse.ArgumentParser(
        prog="keras-attn plugins", description="List registered components and their plugins."
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _plugins_command(argv, out):
    args = _plugins_parser().parse_args(argv)
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


# -- pattern --------------------------------------------------------------------------

# The options every pattern command takes; a pattern argument of the same name is
# given as --pattern-NAME instead.
_COMMON = ("length", "query_length", "offset", "config", "ascii", "help", "name")


def _pattern_parser(cls=None, name=None):
    """The parser of ``keras-attn pattern``: for pattern `cls`, or for --config."""
    if cls is None:
        parser = argparse.ArgumentParser(
            prog="keras-attn pattern",
            description="Draw a pattern's mask: one line per query, one character per key.",
            epilog="`keras-attn pattern NAME --help` lists the arguments of pattern NAME; "
            "`keras-attn plugins` lists the pattern names.",
        )
        parser.add_argument("name", nargs="?", metavar="NAME", help="a registered pattern name")
        parser.add_argument(
            "--config", help='the pattern as JSON, e.g. {"name": "local", "config": {...}}'
        )
    else:
        parser = argparse.ArgumentParser(
            prog=f"keras-attn pattern {name}",
            description=_summary(cls),
            epilog=f"pattern {name!r} is {cls.__module__}.{cls.__qualname__}.",
        )
        parser.add_argument("name", metavar="NAME", help=f"the pattern's name, here {name!r}")
        group = parser.add_argument_group(
            f"arguments of pattern {name!r}",
            "Values are read as JSON where they parse (3, true, [0, 5]), else as text.",
        )
        documented = _argument_docs(cls)
        for param in _pattern_parameters(cls):
            _add_pattern_option(group, param, documented.get(param.name, ""))
    _add_drawing_options(parser)
    return parser


def _add_drawing_options(parser, required=True):
    parser.add_argument(
        "--length", type=int, required=required, help="number of keys (and queries)"
    )
    parser.add_argument("--query-length", type=int, help="number of queries, if not --length")
    parser.add_argument(
        "--offset", type=int, default=0, help="absolute position of the first query"
    )
    parser.add_argument("--ascii", action="store_true", help="draw with # and . only")


def _pattern_parameters(cls):
    """The constructor arguments of a pattern class that can be given as options."""
    return [
        p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _add_pattern_option(group, param, doc):
    flag = param.name if param.name not in _COMMON else f"pattern_{param.name}"
    flag = "--" + flag.replace("_", "-")
    required = param.default is inspect.Parameter.empty
    default = "required" if required else f"default: {param.default!r}"
    text = f"({default}) {doc}".strip().replace("%", "%%")
    if isinstance(param.default, bool):
        group.add_argument(
            flag,
            dest=f"pattern:{param.name}",
            action=argparse.BooleanOptionalAction,
            default=param.default,
            help=text,
        )
        return
    group.add_argument(
        flag,
        dest=f"pattern:{param.name}",
        metavar=param.name.upper(),
        type=_parse_value,
        default=None if required else param.default,
        required=required,
        help=text,
    )


def _summary(cls):
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n")[0].replace("``", "").replace("%", "%%")


def _argument_docs(cls):
    """``{argument: its line of text}`` from the Google-style "Args:" sections of `cls`."""
    docs = {}
    for klass in reversed(cls.__mro__):  # a subclass's own words win
        lines = (inspect.getdoc(klass) or "").splitlines()
        if "Args:" not in lines:
            continue
        name = None
        for line in lines[lines.index("Args:") + 1 :]:
            if line and not line.startswith(" "):
                break  # the next section
            entry = re.match(r"^ {4}(\w+)(?: \(.*?\))?: ?(.*)$", line)
            if entry:
                name = entry.group(1)
                docs[name] = entry.group(2).strip()
            elif name and line.strip():
                docs[name] += " " + line.strip()
    return {k: v.replace("``", "") for k, v in docs.items()}


def _parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pattern_command(argv, out):
    # A first look, to learn which parser reads the line: NAME's own or --config's.
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("name", nargs="?")
    peek.add_argument("--config")
    _add_drawing_options(peek, required=False)
    seen, _ = peek.parse_known_args(argv)
    generic = _pattern_parser()
    if seen.name is not None and seen.config is not None:
        generic.error(
            "give a pattern NAME (with its options) or --config JSON, not both. "
            f"Received: NAME={seen.name!r} and --config={seen.config!r}"
        )
    if seen.name is None:
        if "-h" in argv or "--help" in argv:
            generic.parse_args(["--help"])
        args = generic.parse_args(argv)
        if args.config is None:
            generic.error("give a pattern NAME or --config JSON")
        pattern = _pattern_from_config(args.config, generic)
    else:
        from keras_attn import plugins

        cls = plugins.get("pattern", seen.name)
        parser = _pattern_parser(cls, seen.name)
        args = parser.parse_args(argv)
        kwargs = {
            key.split(":", 1)[1]: value
            for key, value in vars(args).items()
            if key.startswith("pattern:")
        }
        pattern = cls(**kwargs)
        generic = parser
    return _draw(pattern, args, generic, out)


def _pattern_from_config(config, parser):
    from keras_attn import plugins

    try:
        spec = json.loads(config)
    except json.JSONDecodeError as e:
        parser.error(f"--config must be JSON: {e}. Received: --config={config!r}")
    return plugins.resolve("pattern", spec)


def _draw(pattern, args, parser, out):
    from keras_attn import viz

    for flag, value in (("--length", args.length), ("--query-length", args.query_length)):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be a positive integer. Received: {flag}={value}")
    query_length = args.query_length or args.length
    mask = viz.pattern_mask(pattern, query_length, args.length, query_offset=args.offset)
    print(repr(pattern), file=out)
    allowed, blocked = ("#", ".") if args.ascii else (viz.ALLOWED, viz.BLOCKED)
    print(viz.render_mask(mask, allowed, blocked, query_offset=args.offset), file=out)
    return 0


def main(argv=None, out=None):
    """Run the command line `argv` (default: ``sys.argv[1:]``), printing to `out`.

    Returns:
        The exit status: 0, or 2 for an error of the user's (also raised by
        argparse as ``SystemExit(2)``).
    """
    out = sys.stdout if out is None else out
    argv = sys.argv[1:] if argv is None else list(argv)
    args, _ = make_parser().parse_known_args(argv)
    rest = argv[argv.index(args.command) + 1 :]
    from keras_attn.errors import PluginError

    try:
        if args.command == "plugins":
            return _plugins_command(rest, out)
        return _pattern_command(rest, out)
    except (PluginError, ValueError, TypeError) as e:
        print(f"keras-attn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
