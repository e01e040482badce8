"""Evaluation outputs: CSV tables, ROC and heatmap PNGs (matplotlib Agg), a one-page Markdown report,
and their logging to MLflow."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from mfr_ray.evaluation.analyses.catalog import registered_analyses
from mfr_ray.evaluation.metric_names import metric_key


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_matrix_csv(path: Path, variants: list[str], table: np.ndarray) -> Path:
    rows = [{"template \\ probe": v} | {p: f"{table[i, j]:.4f}" for j, p in enumerate(variants)}
            for i, v in enumerate(variants)]
    return write_csv(path, rows)


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], far_targets: list[float]) -> Path:
    """ROC with a log FAR axis (the operating points that matter are at 1e-3 and below)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    for label, (far, tpr) in curves.items():
        keep = far > 0
        ax.plot(far[keep], tpr[keep], label=label)
    for target in far_targets:
        ax.axvline(target, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_heatmap(path: Path, variants: list[str], table: np.ndarray, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.3 * len(variants) + 2, 1.1 * len(variants) + 1.5), dpi=110)
    image = ax.imshow(table * 100, cmap="viridis", vmin=np.nanmin(table) * 100, vmax=np.nanmax(table) * 100)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_yticks(range(len(variants)), variants)
    ax.set_xlabel("probe")
    ax.set_ylabel("template")
    for i in range(len(variants)):
        for j in range(len(variants)):
            ax.text(j, i, f"{table[i, j] * 100:.1f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="%")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def pct_cell(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 100:.2f}"


def verification_table(rows: list[dict], far_targets: list[float]) -> list[str]:
    """Markdown table of verification rows (one per protocol x variant), mean ± std over folds in %."""
    header = ["protocol", "variant", "max accuracy"]
    for t in far_targets:
        header += [f"TPR@FAR={t:g}", f"ACC@FAR={t:g}", "FAR reached"]
    header += ["EER", "AUC"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def mean_std(row: dict, metric: str, far: float | None = None) -> str:
        return f"{pct_cell(row[metric_key(metric, far)])} ± {pct_cell(row[metric_key(metric, far, 'std')])}"

    for row in rows:
        cells = [row["protocol"], row["variant"], mean_std(row, "accuracy")]
        for t in far_targets:
            cells += [mean_std(row, "tpr", t), mean_std(row, "accuracy", t)]
            cells.append(pct_cell(row[metric_key("far", t)]))
        cells += [pct_cell(row["eer"]), f"{row['auc']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_report(summary: dict) -> str:
    """One page a person reads first: headline numbers, per-fold table, FAR caveat, then the extras."""
    lines = [f"# Evaluation: {summary['name']}", ""]
    folds_note = "" if summary["official_folds"] else ", folds assigned deterministically"
    lines += [f"- model: `{summary['model']}`",
              f"- pairs: `{summary['pairs_file']}` ({summary['n_pairs']} pairs, {summary['n_folds']} folds{folds_note})",
              f"- images: {summary['n_images']} per variant; alignment: {summary['alignment']}", ""]
    lines += ["## Verification (mean ± std over folds, %)", ""]
    lines += verification_table(summary["verification"], summary["far_targets"])
    lines += ["", ("Scores are cosine similarities of L2-normalised embeddings; a pair is accepted when its score "
                   "is >= the threshold chosen on the other folds (max accuracy: best cut; FAR: the smallest "
                   "similarity whose FAR on the training folds is <= the target).")]
    for note in summary.get("far_notes", []):
        lines += ["", f"**Note:** {note}"]
    lines += ["", "## Per fold (first protocol, reference variant)", ""]
    folds = summary["fold_table"]
    counts = {metric_key("false_accepts", t, stat=None) for t in summary["far_targets"]}
    cols = ["fold", "accuracy"] + [metric_key(m, t, stat=None) for t in summary["far_targets"]
                                   for m in ("tpr", "far", "accuracy", "false_accepts")]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in folds:
        cells = [str(row[c]) if c == "fold" or c in counts else pct_cell(row[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    for name, analysis in registered_analyses():
        if summary.get(name):
            lines += analysis.report_section(summary[name])
    if summary.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
    lines += ["", "Files: `folds.csv`, `roc.png`, `mask_matrix_*.csv/png`, `embeddings.npz`, `summary.json`."]
    return "\n".join(lines) + "\n"


def write_summary_json(path: Path, summary: dict) -> Path:
    path.write_text(json.dumps(summary, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return path


def log_to_mlflow(metrics: dict[str, float], output_dir: Path) -> None:
    """Log finite numeric metrics and every file of the output folder to the active MLflow run."""
    import mlflow

    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, int | float | np.floating | np.integer) and math.isfinite(float(v))}
    items = list(clean.items())
    for start in range(0, len(items), 200):
        mlflow.log_metrics(dict(items[start : start + 200]))
    mlflow.log_artifacts(str(output_dir))
