"""A new model variant from scratch in Python: define it, derive it, read it, solve it.

The variant: two tokens, target y = (He2(z*_1) + He2(z*_2)) / 2 + c z*_1 z*_2 (a He2 feature
per token plus a cross-token product of strength c, a symbolic parameter), learned by a tied
student with the same link and the opposite-paired positional encoding C = [[1], [-1]], so the
state is (m, e). `Model.from_links` builds it without a TOML file; the script then

  1. derives it (writes <out>/generated/he2_cross_pe.py), writes its LaTeX document to
     <out>/he2_cross_pe.tex and prints the lines of the population loss,
  2. evaluates the loss, the drift and the diffusion at one state,
  3. prints its sequence information exponent (SIE) and flatness, and its largest learning rate,
  4. solves the overlap ODE from m0 = 1/sqrt(d), e0 = 0.2 for a few values of c (the cross term
     adds signal: the escape comes earlier; the positional overlap e is of no use and decays)
     and plots m(t) and e(t) to <out>/new_variant.png.

    python3 examples/derive_new_variant.py [--out DIR] [--quick]
"""
from __future__ import annotations

import ssi_symbolic as ssi
from _common import command_line, pyplot, save


def main() -> int:
    args = command_line(__doc__, "two values of c instead of four").parse_args()
    out = args.out

    model = ssi.Model.from_links(
        "he2_cross_pe", 2,
        teacher="(He(2, z1) + He(2, z2)) / 2 + c * z1 * z2",   # the student link defaults to it
        positional=[[1.0], [-1.0]], parameters={"c": 0.5},
        out_dir=out / "generated")
    print(model)
    print("module:", model.derive())

    latex = model.latex()
    out.mkdir(parents=True, exist_ok=True)
    (out / "he2_cross_pe.tex").write_text(latex)                  # pdflatex-ready
    start = latex.index(r"\section*{Population loss}")
    print("LaTeX (population loss):")
    print("\n".join(latex[start:].splitlines()[:8]))

    point = model.evaluate(m=0.3, e=0.1, eta=0.05, d=1000)
    print(f"at m = 0.3, e = 0.1: loss {point['loss']:.6g}, drift "
          + ", ".join(f"d{k}/dt = {v:.4g}" for k, v in point["drift"].items()))
    print("SIE and flatness:", {k: model.sie()[k] for k in ("sie", "flatness")})
    print(f"max learning rate: {model.max_lr()['max_lr']:.6g}")

    fig, ax = pyplot().subplots(figsize=(7, 4))
    for i, c in enumerate((0.0, 0.5) if args.quick else (0.0, 0.25, 0.5, 0.75)):
        sol = model.solve(eta=0.05, d=1000, e0=0.2, params={"c": c})
        print(f"c = {c}: escape time {sol['escape_time']:.4g}, alignment time "
              f"{sol['alignment_time']:.4g}, fixed point "
              + ", ".join(f"{k} = {v:.4g}" for k, v in sol["fixed_point"].items()))
        ax.plot(sol["t"], sol["overlaps"]["m"], color=f"C{i}", label=f"m, c = {c}")
        ax.plot(sol["t"], sol["overlaps"]["e"], color=f"C{i}", ls=":")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("t = steps / d")
    ax.set_ylabel("overlap (m solid, e dotted)")
    ax.set_title("he2_cross_pe: ODE at eta = 0.05, d = 1000, e0 = 0.2")
    ax.legend(fontsize=8)
    save(fig, out / "new_variant.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
