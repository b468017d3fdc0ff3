"""The campaign's report: `RESULTS.md` (one table per dataset: seeds grouped, mean ± std) and
`auc_vs_epsilon.png` (test AUC against achieved ε), both rewritten from `results.jsonl` alone.

Light at import: matplotlib loads when the plot is drawn.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# peft_deer's modules (main's paths), in one place:
from ..methods import METHODS
from .grid import CAMPAIGN_SET, resolved, setting_defaults
from .store import PLOT, REPORT, RESULTS, latest_by_id, read_results, utc_now

# Settings the report shows as the privacy column rather than as settings of their own.
PRIVACY_SETTINGS = ("dp", "epsilon", "noise_multiplier", "record_epsilon", "record_noise_multiplier")
# Settings the common-settings line never shows: the table's own columns, and paths.
REPORT_HIDDEN = ("seed", "method", "dataset", *PRIVACY_SETTINGS, *CAMPAIGN_SET, "data_dir", "config")
LEVEL_ORDER = {"none": 0, "record": 1, "client": 2, "client,record": 3}


def _g(x: Any) -> str:
    return f"{x:g}" if isinstance(x, int | float) else str(x)


def privacy_of(settings: Mapping[str, Any]) -> tuple[tuple, str, str]:
    """(sort key, label e.g. 'client ε=8', level e.g. 'client') of a run's resolved settings."""
    levels = settings["dp"].split(",")
    parts, targets = [], []
    for level, eps_key, sigma_key in (
        ("record", "record_epsilon", "record_noise_multiplier"),
        ("client", "epsilon", "noise_multiplier"),
    ):
        if level in levels:
            eps, sigma = settings.get(eps_key), settings.get(sigma_key)
            parts.append(f"{level} ε={_g(eps)}" if eps is not None else f"{level} σ={_g(sigma)}")
            targets.append(eps if eps is not None else math.inf)
    level = settings["dp"]
    return (LEVEL_ORDER.get(level, 9), *targets), " + ".join(parts) or "none", level


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pm(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {'–' if std is None else f'{std:.3f}'}"


def _balanced(metrics: Mapping[str, Any] | None) -> float | None:
    """Balanced accuracy: reported as such, else macro recall (the same quantity)."""
    if not metrics:
        return None
    return metrics.get("balanced_accuracy", metrics.get("recall_macro"))


def _probe_val_auc(row: Mapping[str, Any]) -> float | None:
    info = row.get("probe") or {}
    return (info.get("val_scores") or {}).get(str(info.get("C")))


@dataclass
class _Group:
    """The ok runs of one table row (all seeds of one setting)."""

    dataset: str
    method: str
    privacy: tuple[tuple, str, str]
    other: tuple[tuple[str, Any], ...]  # settings that vary within the dataset besides method/privacy/seed
    rows: list[dict[str, Any]] = field(default_factory=list)

    def values(self, get) -> list[float]:
        return [v for v in (get(r) for r in self.rows) if v is not None]


def _groups(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, list[_Group]], dict[str, list[str]]]:
    """Ok federated rows grouped per dataset into table rows; and per dataset the varying settings."""
    by_dataset: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("kind", "run") == "run" and row.get("status") == "ok":
            by_dataset.setdefault(row["dataset"], []).append({**row, "_s": resolved(row["settings"])})
    groups: dict[str, list[_Group]] = {}
    varying: dict[str, list[str]] = {}
    ignore = {"seed", "method", "dataset", *PRIVACY_SETTINGS}
    for dataset, ds_rows in by_dataset.items():
        keys = sorted({k for r in ds_rows for k in r["_s"]} - ignore)
        varying[dataset] = [k for k in keys if len({json.dumps(r["_s"].get(k), default=str) for r in ds_rows}) > 1]
        table: dict[tuple, _Group] = {}
        for r in ds_rows:
            s = r["_s"]
            other = tuple((k, s.get(k)) for k in varying[dataset])
            privacy = privacy_of(s)
            key = (s["method"], privacy[1], json.dumps(other, default=str))
            table.setdefault(key, _Group(dataset, s["method"], privacy, other)).rows.append(r)
        method_rank = {m: i for i, m in enumerate(METHODS)}
        groups[dataset] = sorted(
            table.values(),
            key=lambda g: (
                method_rank.get(g.method, len(METHODS)),
                g.method,
                g.privacy[0],
                tuple(_sort_value(v) for _, v in g.other),
            ),
        )
    return groups, varying


def _sort_value(value: Any) -> tuple:
    """Numbers in numeric order, then strings, then unset."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value)) if value is not None else (2, 0, "")


def _datasets_in_order(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["dataset"] for r in rows))


def render_markdown(rows: Sequence[Mapping[str, Any]], planned: int | None = None, description: str = "") -> str:
    """RESULTS.md from the campaign's latest rows (one per id)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    groups, varying = _groups(rows)
    probes = [r for r in ok if r.get("kind") == "probe"]
    has_balanced = any(_balanced(r.get("test_final")) is not None for r in ok)
    has_val = any(r.get("val_auc_final") is not None for r in ok)
    counts = f"{len(ok)} ok, {len(failed)} failed" + (f", of {planned} planned" if planned is not None else "")
    lines = [
        "# Results campaign",
        "",
        *([description.strip(), ""] if description else []),
        f"{counts} (from `{RESULTS}`, written {utc_now()}). Test metrics of the final adapter; mean ± sample std "
        'over seeds ("–": one seed). AUC is macro one-vs-rest with more than two classes. ε achieved: '
        "client-level ε (RDP) and/or record-level ε (max over clients) as each run's `privacy.json` states "
        "(δ as set). Seconds: mean wall time per run, start-up included. The linear probe is centralized "
        "(no federation, no DP) on frozen features: CLS + mean patch token, C chosen on validation."
        + (
            " Val AUC: the validation split's AUC after the last round (the probe: at the chosen C), the "
            "figure to choose settings by; test AUC is not for choosing."
            if has_val
            else ""
        ),
        "",
        f"![test AUC vs ε]({PLOT})",
    ]
    for dataset in _datasets_in_order(rows):
        ds_groups, other_keys = groups.get(dataset, []), varying.get(dataset, [])
        ds_runs = [g.rows[0]["_s"] for g in ds_groups]
        lines += ["", f"## {dataset}", ""]
        if ds_runs:
            listed = (
                "model",
                "image_size",
                "lora_layers",
                "rank",
                "num_clients",
                "clients_per_round",
                "partition",
                "dirichlet_alpha",
                "train_subset",
                "rounds",
                "local_epochs",
                "optimizer",
                "lr",
                "batch_size",
                "delta",
                "record_delta",
            )  # fmt: skip
            # then every other setting the rows share at a non-default value (e.g. lora_alpha, head_init):
            # a row must never read as the default method when all of its dataset's runs changed it
            defaults = setting_defaults()
            unlisted = sorted(
                k
                for k, v in ds_runs[0].items()
                if k not in listed and k not in REPORT_HIDDEN and v != defaults.get(k, v) and v is not None
            )
            common = [
                f"{k}={_g(ds_runs[0].get(k))}"
                for k in (*listed, *unlisted)
                if k not in other_keys and ds_runs[0].get(k) is not None
            ]
            lines += [f"Common settings: {', '.join(common)}.", ""]
        head = ["method", "privacy", *other_keys, *(["val AUC"] if has_val else []), "test AUC"]
        head += ["balanced acc."] if has_balanced else []
        head += ["ε achieved", "runs", "mean s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in (p for p in probes if p["dataset"] == dataset):
            info = r.get("probe") or {}
            size = info.get("image_size") or r["settings"].get("image_size")
            name = f"linear-probe ({r['settings'].get('model')}, {size} px, centralized; C={_g(info.get('C'))})"
            cells = [name, "none", *("–" for _ in other_keys)]
            cells += [_pm([_probe_val_auc(r)])] if has_val else []
            cells.append(_pm([(r["test_final"] or {}).get("auc")]))
            cells += [_pm([_balanced(r["test_final"])])] if has_balanced else []
            cells += ["–", "1", f"{r['seconds']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        for g in ds_groups:
            eps = _pm_eps(g)
            cells = [g.method, g.privacy[1], *(_g(v) for _, v in g.other)]
            if has_val:
                cells.append(_pm(g.values(lambda r: r.get("val_auc_final"))))
            cells.append(_pm(g.values(lambda r: (r["test_final"] or {}).get("auc"))))
            if has_balanced:
                cells.append(_pm(g.values(lambda r: _balanced(r["test_final"]))))
            seconds = g.values(lambda r: r.get("seconds"))
            cells += [eps, str(len(g.rows)), f"{statistics.fmean(seconds):.0f}" if seconds else "n/a"]
            lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            s = resolved(r["settings"]) if r.get("kind", "run") == "run" else r["settings"]
            what = privacy_of(s)[1] if r.get("kind", "run") == "run" else "linear probe"
            label = f" ({r['label']})" if r.get("label") else ""
            lines.append(f"- `{r['id']}` {r['dataset']}, {r['method']}, {what}, seed {r.get('seed')}{label}:")
            lines += ["", "  ```", *(f"  {line}" for line in (r.get("error") or "no error text").splitlines()), "  ```"]
    return "\n".join(lines) + "\n"


def _pm_eps(g: _Group) -> str:
    """ε achieved of a table row: client and/or record level, mean over its runs (2 decimals)."""
    parts = []
    for key, name in (("record_epsilon", "record"), ("epsilon", "client")):
        values = g.values(lambda r, key=key: r.get(key))
        if values:
            parts.append(f"{name} {statistics.fmean(values):.2f}")
    return " / ".join(parts) if parts else "–"


def plot_auc_vs_epsilon(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Test AUC (final adapter) vs achieved ε (log x): one panel per dataset, one line per (method,
    privacy level, other varying settings); no-DP runs as dashed and the linear probe as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, _ = _groups(rows)
    probes = [r for r in rows if r.get("kind") == "probe" and r.get("status") == "ok"]
    datasets = [d for d in _datasets_in_order(rows) if d in groups or any(p["dataset"] == d for p in probes)]
    datasets = datasets or ["(no results yet)"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 5.2), squeeze=False)
    colors = plt.get_cmap("tab10")
    method_color = {m: colors(i % 10) for i, m in enumerate(METHODS)}
    styles = {"client": "-", "record": "-.", "client,record": (0, (5, 1, 1, 1, 1, 1))}
    markers = "osD^vP*X"
    for ax, dataset in zip(axes[0], datasets, strict=True):
        lines: dict[tuple, list[tuple[float, float, float | None]]] = {}
        others = sorted({g.other for g in groups.get(dataset, [])}, key=lambda o: tuple(_sort_value(v) for _, v in o))
        other_values = [json.dumps(o, default=str) for o in others]
        for g in groups.get(dataset, []):
            color = method_color.get(g.method, colors(len(method_color) % 10))
            marker = markers[other_values.index(json.dumps(g.other, default=str)) % len(markers)]
            other = ", ".join(f"{k}={_g(v)}" for k, v in g.other)
            mean_auc, std_auc = _mean_std(g.values(lambda r: (r["test_final"] or {}).get("auc")))
            if mean_auc is None:
                continue
            level = g.privacy[2]
            if level == "none":
                label = f"{g.method}, no DP" + (f" ({other})" if other else "")
                ax.axhline(mean_auc, color=color, linestyle="--", linewidth=1.2, label=label)
                continue
            key_eps = "epsilon" if "client" in level.split(",") else "record_epsilon"
            eps, _ = _mean_std(g.values(lambda r, k=key_eps: r.get(k)))
            if eps is None or eps <= 0:
                continue
            lines.setdefault((g.method, level, other, color, marker), []).append((eps, mean_auc, std_auc))
        for (method, level, other, color, marker), points in lines.items():
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            yerr = [p[2] or 0.0 for p in points]
            label = f"{method}, {level.replace(',', '+')}-level DP" + (f" ({other})" if other else "")
            ax.errorbar(xs, ys, yerr=yerr, color=color, linestyle=styles.get(level, "-"), marker=marker,
                        capsize=3, label=label)  # fmt: skip
        for p in (p for p in probes if p["dataset"] == dataset):
            auc = (p["test_final"] or {}).get("auc")
            if auc is not None:
                size = (p.get("probe") or {}).get("image_size")
                ax.axhline(auc, color="black", linestyle=":", linewidth=1.5, label=f"linear probe ({size} px)")
        ax.set_xscale("log")
        if not lines:
            ax.set_xlim(0.5, 64)
        ax.set_xlabel("ε achieved (log scale)")
        ax.set_ylabel("test AUC (final adapter)")
        ax.set_title(dataset)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(out: Path, planned: int | None = None, description: str = "") -> tuple[Path, Path]:
    """Rewrite `out/RESULTS.md` and `out/auc_vs_epsilon.png` from `out/results.jsonl`."""
    out = Path(out)
    rows = list(latest_by_id(read_results(out)).values())
    md = out / REPORT
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(render_markdown(rows, planned, description))
    os.replace(tmp, md)
    return md, plot_auc_vs_epsilon(rows, out / PLOT)
