"""Write the per-layer R / overlap / MSD tables of saved statistics as Markdown.

Usage: python docs/make_stats_tables.py runs/stats-gemma-3-270m-mgsm [more stats dirs]
"""

import sys

from layerselect import ActivationStats


def table(path: str) -> str:
    s = ActivationStats.load(path)
    r = s.activation_ratio()
    per_group, avg = s.overlap("en")
    msd = s.msd()
    head = "| layer | " + " | ".join(f"R {g}" for g in s.groups) + " | overlap AVG | MSD |"
    lines = [f"### {s.model_name}: {s.num_samples} texts, {int(s.tokens.sum())} tokens\n", head,
             "|" + "---:|" * (len(s.groups) + 3)]
    for i, layer in enumerate(s.layers):
        cells = " | ".join(f"{v:.4f}" for v in r[i].tolist())
        lines.append(f"| {layer} | {cells} | {avg[i]:.4f} | {msd[i]:.3e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(table(p) for p in sys.argv[1:]))
