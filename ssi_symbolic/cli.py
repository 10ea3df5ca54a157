"""The `ssi` command line: thin wrappers that parse arguments, call one function and print.

    ssi derive SPEC... [--out DIR] [--force]     write generated/<name>.py, print its path
    ssi latex SPEC [--out FILE]                  LaTeX document (stdout without --out)
    ssi evaluate SPEC --at m=0.3 --at e=0.1 [--eta 0.05] [--d 1000] [--param k=v] [--json]

Errors are one line on stderr (`ssi: error: ...`) with exit code 2; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import SSIError, SpecError
from .evaluate import DEFAULT_D, DEFAULT_ETA, as_spec, evaluate


def _key_value(text: str, what: str) -> tuple[str, float]:
    if "=" not in text:
        raise SpecError(f"{what} '{text}': expected name=value")
    k, v = text.split("=", 1)
    try:
        return k.strip(), float(v)
    except ValueError:
        raise SpecError(f"{what} '{text}': '{v}' is not a number") from None


def _pairs(items, what) -> dict:
    out = {}
    for it in items or []:
        k, v = _key_value(it, what)
        out[k] = v
    return out


def cmd_derive(args) -> int:
    from .codegen import generate
    specs = [as_spec(s) for s in args.spec]  # validate every spec before writing any
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"two specs share the name '{dup[0]}': they would write one module")
    for spec in specs:
        path, written = generate(spec, args.out, force=args.force)
        if not written:
            print(f"up to date: {path}", file=sys.stderr)
        print(path)
    return 0


def cmd_latex(args) -> int:
    from .codegen import write_atomic
    from .derive import derive
    from .latex import document
    spec = as_spec(args.spec)
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() != ".tex":
            raise SpecError(f"--out {out}: expected a .tex file name")
    text = document(derive(spec))
    if args.out:
        write_atomic(args.out, text)
        print(args.out)
    else:
        sys.stdout.write(text)
    return 0


def _table(result: dict) -> str:
    names = result["overlaps"]
    rows = [f"spec {result['spec']}  method {result['method']}  eta {result['eta']}  "
            f"d {result['d']}",
            "state      " + "  ".join(f"{k}={v:.6g}" for k, v in result["state"].items()),
            f"loss       {result['loss']:.10g}",
            f"{'':10} {'drift':>16} {'O(eta)':>16} {'O(eta^2)':>16}"]
    for k in names:
        rows.append(f"d{k}/dt{'':{max(0, 4 - len(k))}} {result['drift'][k]:16.8g} "
                    f"{result['drift_eta1'][k]:16.8g} {result['drift_eta2'][k]:16.8g}")
    rows.append("diffusion D = Cov(G)/d (rows/cols " + ", ".join(names) + ")")
    for row in result["diffusion"]:
        rows.append("  " + "  ".join(f"{x:14.6g}" for x in row))
    if "quadrature" in result:
        qd = result["quadrature"]
        rows.append(f"quadrature: {qd['nodes_per_dimension']} nodes/dim, loss error estimate "
                    f"{qd['loss_error_estimate']:.2g}")
    return "\n".join(rows)


def cmd_evaluate(args) -> int:
    res = evaluate(args.spec, _pairs(args.at, "--at"), eta=args.eta, d=args.d,
                   params=_pairs(args.param, "--param"), out_dir=args.out)
    print(json.dumps(res) if args.json else _table(res))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssi", description="Exact overlap equations of online SGD "
                                "on sequence single-index models (see MATH.md).")
    p.add_argument("--version", action="version", version=f"ssi-symbolic {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("derive", help="derive and write generated/<name>.py")
    d.add_argument("spec", nargs="+", help="model spec(s) (TOML)")
    d.add_argument("--out", default="generated", help="output folder (default generated/)")
    d.add_argument("--force", action="store_true", help="regenerate even if up to date")
    d.set_defaults(func=cmd_derive)

    la = sub.add_parser("latex", help="LaTeX document of the loss, drift and diffusion")
    la.add_argument("spec")
    la.add_argument("--out", help="write to this .tex file instead of stdout")
    la.set_defaults(func=cmd_latex)

    ev = sub.add_parser("evaluate", help="loss, drift and diffusion at one state")
    ev.add_argument("spec")
    ev.add_argument("--at", action="append", metavar="NAME=VALUE",
                    help="overlap value, e.g. --at m=0.3 --at e=0.1 (missing: 0, q: 1)")
    ev.add_argument("--eta", type=float, default=DEFAULT_ETA, help="learning rate (0.05)")
    ev.add_argument("--d", type=float, default=DEFAULT_D, help="dimension for D (1000)")
    ev.add_argument("--param", action="append", metavar="NAME=VALUE",
                    help="parameter value overriding the spec's default")
    ev.add_argument("--out", default="generated", help="folder of generated modules")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_evaluate)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SSIError as exc:
        print(f"ssi: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
