"""The figures of an evaluation (matplotlib, Agg): confusion matrices, reliability diagram, accuracy by group
and robustness curves. Every number in them is in the evaluation's JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_plots(result: dict, directory: Path) -> list[str]:
    """Write the PNGs of ``result`` (``evaluate_model``'s) into ``directory``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = [_plot_confusion(plt, result, directory / "confusion.png"),
               _plot_reliability(plt, result, directory / "reliability.png")]
    if result.get("risk_coverage"):
        written.append(_plot_risk_coverage(plt, result, directory / "risk-coverage.png"))
    if result.get("by_group", {}):
        written.append(_plot_groups(plt, result["by_group"], directory / "accuracy-by-group.png"))
    if result.get("robustness"):
        written.append(_plot_robustness(plt, result["robustness"], directory / "robustness.png"))
    return written


def _plot_confusion(plt, result: dict, path: Path) -> str:
    title = f"{result['model']['name']} {result['model']['version']} - {result['split']} split"
    matrices = [("", result["confusion_matrix"])]
    if "two_class" in result:
        matrices.append(("2-class collapse", result["two_class"]["confusion_matrix"]))
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 4.2), squeeze=False)
    for ax, (label, cm) in zip(axes[0], matrices):
        m = np.asarray(cm["normalised"])
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, f"{v:.3f}\n({cm['counts'][r][c]})", ha="center", va="center",
                    color="white" if v > 0.5 else "black", fontsize=9)
        ax.set_xticks(range(len(cm["classes"])), cm["classes"], rotation=20)
        ax.set_yticks(range(len(cm["classes"])), cm["classes"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label or f"accuracy {result['accuracy']:.4f}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)


def _plot_reliability(plt, result: dict, path: Path) -> str:
    cal = result["calibration"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8)
    if cal["bins"]:
        conf = [b["confidence"] for b in cal["bins"]]
        acc = [b["accuracy"] for b in cal["bins"]]
        size = [20 + 200 * b["count"] / result["n"] for b in cal["bins"]]
        ax.scatter(conf, acc, s=size)
        ax.plot(conf, acc)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ece = cal["ece"]
    ax.set_title(f"reliability, ECE {ece:.4f}" if ece is not None else "reliability")
    fig.tight_layout()
    return _save(fig, path, plt)


def _plot_risk_coverage(plt, result: dict, path: Path) -> str:
    """Error rate of the answers kept when only the most confident fraction (coverage) is answered."""
    curve = result["risk_coverage"]["curve"]
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.plot(curve["coverage"], curve["risk"], marker="o", ms=3)
    rule = (result.get("model") or {}).get("decision") or {}
    if rule.get("threshold") is not None:
        ax.set_title(f"risk-coverage (decision threshold {rule['threshold']:.3f})", fontsize=9)
    else:
        ax.set_title("risk-coverage", fontsize=9)
    ax.set_xlabel("coverage (fraction answered, most confident first)")
    ax.set_ylabel("error rate of the answered")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, plt)


def _plot_groups(plt, groups: dict, path: Path) -> str:
    fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups), 3.6), squeeze=False)
    for ax, (name, d) in zip(axes[0], groups.items()):
        keys = list(d)
        ax.bar(range(len(keys)), [d[k]["accuracy"] or 0 for k in keys])
        ax.set_xticks(range(len(keys)), keys, rotation=30, fontsize=8)
        for j, k in enumerate(keys):
            ax.text(j, 0.02, str(d[k]["n"]), ha="center", fontsize=7, color="white")
        ax.set_ylim(0, 1)
        ax.set_title(name.replace("_", " "), fontsize=9)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    return _save(fig, path, plt)


def _plot_robustness(plt, rob: dict, path: Path) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    angles = rob["rotation"]["angles_deg"]
    a.plot(angles, rob["rotation"]["random_axis"]["accuracy"], "o-", label="random axis (Q tilted)")
    a.plot(angles, rob["rotation"]["about_q"]["accuracy"], "s--", label="about Q")
    a.set_xlabel("rotation angle (deg)")
    a.set_ylabel("accuracy")
    a.set_ylim(0, 1.02)
    a.legend()
    a.set_title(f"random 3D rotations of {rob['maps']} maps")
    b.plot(rob["zoom"]["factors"], rob["zoom"]["accuracy"], "o-")
    b.set_xscale("log")
    b.set_xticks(rob["zoom"]["factors"], [f"{f:g}" for f in rob["zoom"]["factors"]])
    b.set_xlabel("zoom factor (voxel size / f, oversampling x f)")
    b.set_ylim(0, 1.02)
    b.set_title("voxel size / oversampling sweep")
    for f, acc, os_ in zip(rob["zoom"]["factors"], rob["zoom"]["accuracy"], rob["zoom"]["oversampling_estimated_median"]):
        if acc is not None and os_ is not None:
            b.annotate(f"{os_:.1f}", (f, acc), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
