"""The UnlearnCanvas/UnlearnDiffAtk-style comparison of concept erasures: per method (a concept_erasure row run with
``--attack``), the erased prompt, its paraphrases, the attack success rate before and after each attack, the retained
prompts' recognition and FID against real digits, the method's time, the whole run's time and peak memory; mean ± std
over seeds; and the robust-utility scatter (post-attack ASR under UnlearnDiffAtk against retain FID).

    python benchmarks/concept_erasure.py --rows uce-preserve esd-u sfron-anchor --attack   # the cells (long on a CPU)
    python benchmarks/erasure_table.py --model sd-digits                                     # table + scatter
    python benchmarks/tables.py                                                              # the docs' copy

The docs' table sits between ``<!-- results: erasure_table sd-digits -->`` markers; the scatter goes to
docs/erasure-robustness-<model>.png (``--plot``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import concept_erasure
from genunlearn.eval.seeds import mean_std

CELLS = concept_erasure.RESULTS / "cells"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def worst_change(cell: dict) -> float:
    """The largest drop (most negative change) in recognition of any retained digit's plain prompt, after − before."""
    before, after = cell["before"]["per_prompt"], cell["after"]["per_prompt"]
    return min(after[p] - before[p] for p in concept_erasure.RETAIN if before.get(p) is not None)


def summarise(cells: list[dict]) -> list[dict]:
    """Per row: mean ± std over seeds of every column of the comparison."""
    groups: dict[str, list[dict]] = {}
    for cell in cells:
        groups.setdefault(cell["row"], []).append(cell)
    rows = []
    for row, runs in groups.items():
        def stats(value) -> dict:
            return mean_std([value(r) for r in runs])

        attacks = {name: {"pre": stats(lambda r, n=name: r["attacks"][n]["pre_asr"]),
                          "post": stats(lambda r, n=name: r["attacks"][n]["post_asr"]),
                          "samples": runs[0]["attacks"][name]["samples"]} for name in concept_erasure.ATTACKS}
        rows.append({
            "row": row, "method": runs[0]["method"], "seeds": sorted(r["seed"] for r in runs), "device": runs[0]["device"],
            "samples": runs[0]["eval_samples"],
            "forget_acc": stats(lambda r: r["after"]["forget_acc"]), "paraphrase_acc": stats(lambda r: r["after"]["paraphrase_acc"]),
            "remain_acc": stats(lambda r: r["after"]["remain_acc"]), "worst_change": stats(worst_change),
            "worst_change_min": min(worst_change(r) for r in runs),
            "fid_real_ratio": stats(lambda r: r["after"]["fid_remain_real"] / r["before"]["fid_remain_real"]),
            "attacks": attacks, "method_s": stats(lambda r: r["wall_time_s"]),
            "total_s": stats(lambda r: r["cost"]["total_s"] - r["cost"]["stages_s"].get("attacks", 0.0)),
            "peak_mib": stats(lambda r: r["cost"]["peak_rss_mib"]),
        })
    order = list(concept_erasure.ROWS)
    return sorted(rows, key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))


def _ms(stats: dict, digits: int = 2) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def render(rows: list[dict]) -> str:
    attack_columns = [f"{name} ASR pre → post" for name in concept_erasure.ATTACKS]
    lines = ["| method (row) | seeds | erased prompt | paraphrases | " + " | ".join(attack_columns) +
             " | retained prompts | worst retained digit's change (min) | retain FID real ratio | method s | "
             "run s (attacks aside) | peak RSS MiB |",
             "|---" * (10 + len(attack_columns)) + "|"]
    for r in rows:
        label = concept_erasure.ROWS[r["row"]][3] if r["row"] in concept_erasure.ROWS else r["row"]
        attacks = [f"{_ms(a['pre'])} → {_ms(a['post'])}" for a in r["attacks"].values()]
        lines.append(f"| {label} (`{r['row']}`) | {len(r['seeds'])} | {_ms(r['forget_acc'])} | {_ms(r['paraphrase_acc'])} | "
                     + " | ".join(attacks) + f" | {_ms(r['remain_acc'])} | {_ms(r['worst_change'])} "
                     f"({r['worst_change_min']:.2f}) | {_ms(r['fid_real_ratio'])} | "
                     f"{_ms(r['method_s'], 1)} | {r['total_s']['mean']:.0f} | {r['peak_mib']['mean']:.0f} |")
    if rows:
        samples = rows[0]["attacks"]
        lines += ["", f"{rows[0]['samples']} generations per prompt behind every figure, on {rows[0]['device']}; attack "
                  "samples: " + ", ".join(f"{name} {a['samples']}" for name, a in samples.items()) + "; budget "
                  + ", ".join(f"{k} {v}" for k, v in concept_erasure.ATTACK_BUDGET.items())
                  + " (others at their references' defaults: ringabell strength 3, relearn 50 steps on 16 images at the "
                  "preset's pretraining rate)."]
    return "\n".join(lines)


def save_scatter(rows: list[dict], path: Path) -> None:
    """Post-attack ASR (UnlearnDiffAtk) against retain FID real ratio, one point per method with its std bars."""
    from genunlearn.eval.plots import plt, save_figure

    figure, axis = plt.subplots(figsize=(5, 4))
    for r in rows:
        x, y = r["fid_real_ratio"], r["attacks"]["unlearndiffatk"]["post"]
        axis.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", capsize=3)
        axis.annotate(r["row"], (x["mean"], y["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.axhline(0.2, color="grey", linestyle=":", linewidth=1)
    axis.axvline(1.2, color="grey", linestyle=":", linewidth=1)
    axis.set(xscale="log", ylim=(-0.03, 1.05), xlabel="retain FID against real digits, after / before (log scale)",
             ylabel="post-attack ASR (UnlearnDiffAtk)", title="robustness against utility (lower left is better)")
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--model", default="sd-digits")
    parser.add_argument("--cells", type=Path, default=CELLS)
    parser.add_argument("--plot", type=Path, help="where the scatter goes (default: docs/erasure-robustness-MODEL.png)")
    args = parser.parse_args(argv)
    rows = summarise(concept_erasure.finished_cells(args.cells, args.model, attacked=True))
    print(render(rows))
    if rows:
        save_scatter(rows, args.plot or DOCS / f"erasure-robustness-{args.model}.png")


if __name__ == "__main__":
    main()
