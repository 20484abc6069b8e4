"""A sweep's report: results.csv / results.jsonl (one row per variant), report.md (the table,
the best variant per metric, a short automatic reading) and PNG figures under figures/."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

COLUMNS = [
    ("name", "variant"),
    ("status", "status"),
    ("trainable_params", "trainable"),
    ("trainable_pct", "trainable %"),
    ("final_train_loss", "train loss"),
    ("best_eval_loss", "best eval loss"),
    ("final_eval_loss", "final eval loss"),
    ("final_perplexity", "perplexity"),
    ("exact_match", "exact match"),
    ("general_loss", "general loss"),
    ("facts_kept", "facts kept"),
    ("train_s", "train s"),
    ("wall_s", "wall s"),
    ("tokens_per_s", "tokens/s"),
    ("peak_memory_mb", "peak MB"),
    ("adapter_bytes", "saved bytes"),
]
OVERFIT_RISE = 0.02  # final eval loss above its minimum by more than this share: overfitting
PLATEAU = 0.01  # within this share of the best eval loss: no real improvement
CLOSE = 0.05  # exact match within this many points of the best: as good, within the noise


def write_report(sweep: Any, records: list[dict[str, Any]], baseline: dict | None = None) -> list:
    """Write the report files into the sweep folder; returns their paths."""
    out = Path(sweep.output_dir)
    files = [_write_csv(out / "results.csv", records), _write_jsonl(out / "results.jsonl", records)]
    files += write_figures(out / "figures", sweep, records)
    report = out / "report.md"
    report.write_text(render_markdown(sweep, records, baseline, files), encoding="utf-8")
    return [*files, report]


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """A record without its long fields (curves, answers, traceback), for the table files."""
    skip = {"curve", "answers", "traceback", "gap"}
    row = {k: v for k, v in record.items() if k not in skip}
    row["overrides"] = json.dumps(record.get("overrides", {}))
    return row


def _write_csv(path: Path, records: list[dict[str, Any]]) -> Path:
    rows = [_flat(r) for r in records]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, default=str) + "\n")
    return path


# ---------------------------------------------------------------- Markdown


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in ("exact_match", "facts_kept"):
        return f"{value:.1%}"
    if key in ("trainable_params", "adapter_bytes"):
        return f"{value:,}"
    if key == "trainable_pct":
        return f"{value:.3g}%"
    if isinstance(value, float):
        if key.endswith("loss") or key == "final_perplexity":
            return f"{value:.4g}"
        return f"{value:.1f}" if key.endswith("_s") else f"{value:.0f}"
    return str(value)


def render_markdown(
    sweep: Any, records: list[dict[str, Any]], baseline: dict | None, files: list[Path]
) -> str:
    """The report: table, best per metric, automatic reading, figures, answers, failures."""
    lines = [f"# Sweep: {Path(sweep.source).name}", ""]
    finished = [r for r in records if r.get("status") == "finished"]
    lines.append(f"{len(finished)} of {len(records)} variants finished.")
    lines.append("")
    keys = [k for k, _ in COLUMNS if any(r.get(k) is not None for r in records)]
    lines.append("| " + " | ".join(dict(COLUMNS)[k] for k in keys) + " |")
    lines.append("|" + "---|" * len(keys))
    if baseline:
        row = {"name": "base model (no training)", "status": "reference", **baseline}
        lines.append("| " + " | ".join(_cell(k, row.get(k)) for k in keys) + " |")
    for record in records:
        lines.append("| " + " | ".join(_cell(k, record.get(k)) for k in keys) + " |")
    lines += ["", "## Best variant per metric", ""]
    lines += [f"- {text}" for text in best_per_metric(finished)] or ["- (no finished variant)"]
    lines += ["", "## Reading", ""]
    lines += [f"- {text}" for text in reading(sweep, finished, baseline)] or ["- (nothing to say)"]
    figures = [p for p in files if p.suffix == ".png"]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{p.stem}](figures/{p.name})" for p in figures]
    answered = [r for r in finished if r.get("answers")]
    if baseline and baseline.get("answers") and answered:
        answered = [{"name": "base model", **baseline}, *answered]
    if answered:
        lines += ["", "## Answers to the fixed prompts (greedy)", ""]
        for prompt_index, item in enumerate(answered[0]["answers"]):
            lines.append(f"**{item['prompt']}**")
            lines.append("")
            for record in answered:
                text = record["answers"][prompt_index]["answer"].strip().replace("\n", " ")
                lines.append(f"- {record['name']}: {text}")
            lines.append("")
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        lines += ["", "## Failed variants", ""]
        lines += [f"- {r['name']}: {r.get('error', '')}" for r in failed]
    return "\n".join(lines).rstrip() + "\n"


def best_per_metric(finished: list[dict[str, Any]]) -> list[str]:
    """'lowest best eval loss: r=16 (0.412)', ... for the metrics the records have."""
    metrics = [
        ("best_eval_loss", "lowest eval loss", min, "{:.4g}"),
        ("exact_match", "highest exact match", max, "{:.1%}"),
        ("tokens_per_s", "fastest", max, "{:.0f} tokens/s"),
        ("peak_memory_mb", "least memory", min, "{:.0f} MB"),
        ("trainable_params", "fewest trainable parameters", min, "{:,}"),
    ]
    out = []
    for key, label, pick, fmt in metrics:
        have = [r for r in finished if r.get(key) is not None]
        if len({r[key] for r in have}) > 1:  # a metric where all agree names no best
            best = pick(have, key=lambda r, k=key: r[k])
            out.append(f"{label}: {best['name']} ({fmt.format(best[key])})")
    return out


def _numeric_axis(finished: list[dict[str, Any]], key: str) -> bool:
    values = [r["overrides"].get(key) for r in finished]
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def reading(sweep: Any, finished: list[dict[str, Any]], baseline: dict | None) -> list[str]:
    """Short sentences read off the numbers: plateaus, overfitting, LoRA vs full."""
    out = []
    for key in sweep.axes:
        if key == "variant" or not finished or not _numeric_axis(finished, key):
            continue
        for group, rows in _groups(finished, key).items():
            rows = [r for r in rows if r.get("best_eval_loss") is not None]
            if len(rows) < 3:
                continue
            rows.sort(key=lambda r: r["overrides"][key])
            best = min(r["best_eval_loss"] for r in rows)
            enough = next(r for r in rows if r["best_eval_loss"] <= best * (1 + PLATEAU))
            name = key.rsplit(".", 1)[-1]
            where = f" ({group})" if group else ""
            if enough is rows[-1]:
                out.append(
                    "eval loss still improves at the largest "
                    f"{name}={enough['overrides'][key]}{where}"
                )
            else:
                out.append(
                    f"eval loss stops improving above {name}={enough['overrides'][key]}{where}: "
                    f"{enough['best_eval_loss']:.4g}, within {PLATEAU:.0%} of the best {best:.4g}"
                )
    for record in finished:
        text = overfitting(record)
        if text:
            out.append(text)
    out += cheapest_close_to_best(finished)
    out += full_vs_lora(finished, baseline)
    out += forgetting(finished, baseline)
    out += score_noise(finished)
    return out


def cheapest_close_to_best(finished: list[dict[str, Any]]) -> list[str]:
    """The variant with the fewest trainable parameters whose exact match is within CLOSE of
    the best."""
    rows = [r for r in finished if r.get("exact_match") is not None and r.get("trainable_params")]
    if len(rows) < 3:
        return []
    best = max(rows, key=lambda r: r["exact_match"])
    close = [r for r in rows if r["exact_match"] >= best["exact_match"] - CLOSE]
    cheapest = min(close, key=lambda r: r["trainable_params"])
    if cheapest["trainable_params"] >= best["trainable_params"]:
        return [
            f"{best['name']} has the best exact match ({best['exact_match']:.1%}); every variant "
            f"with fewer trainable parameters is more than {CLOSE * 100:.0f} points below it"
        ]
    share = cheapest["trainable_params"] / best["trainable_params"]
    return [
        f"{cheapest['name']} comes within {CLOSE * 100:.0f} points of the best exact match "
        f"({cheapest['exact_match']:.1%} against {best['name']}'s {best['exact_match']:.1%}) with "
        f"{share:.0%} of its trainable parameters"
    ]


def score_noise(finished: list[dict[str, Any]]) -> list[str]:
    """How far apart two exact-match scores must be before they differ beyond chance."""
    counts = [r["exact_match_questions"] for r in finished if r.get("exact_match_questions")]
    if not counts:
        return []
    n = min(counts)
    error = 0.5 / math.sqrt(n)  # the largest standard error of a share of n answers (at 50%)
    return [
        f"exact match is scored on {n} questions: its standard error is up to "
        f"{error * 100:.0f} points, so differences under ~{2 * error * 100:.0f} points "
        "may be chance"
    ]


def _groups(finished: list[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by the overrides other than `key` (and keys paired with it in zip)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in finished:
        others = {
            k: v
            for k, v in record["overrides"].items()
            if k != key and not _varies_with(finished, key, k)
        }
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in others.items())
        groups.setdefault(label, []).append(record)
    return groups


def _varies_with(finished: list[dict[str, Any]], key: str, other: str) -> bool:
    """True when `other` is a function of `key` across the records (a zipped partner)."""
    seen: dict[str, Any] = {}
    for record in finished:
        a, b = json.dumps(record["overrides"].get(key)), record["overrides"].get(other)
        if a in seen and seen[a] != b:
            return False
        seen[a] = b
    return len(set(json.dumps(v) for v in seen.values())) > 1


def overfitting(record: dict[str, Any]) -> str | None:
    """'r=64 overfits from step 40: ...' when eval loss rose after its minimum while train fell."""
    evals = [item for item in record.get("curve", {}).get("eval", []) if item[0] > 0]
    if len(evals) < 2:
        return None
    best_step, best = min(evals, key=lambda item: item[1])
    final = evals[-1][1]
    if best_step == evals[-1][0] or final <= best * (1 + OVERFIT_RISE):
        return None
    return (
        f"{record['name']} overfits from step {best_step}: eval loss {best:.4g} there, "
        f"{final:.4g} at the end (train loss {record.get('final_train_loss', float('nan')):.4g})"
    )


def full_vs_lora(finished: list[dict[str, Any]], baseline: dict | None) -> list[str]:
    """The share of full fine-tuning's exact-match gain (over the base model) each LoRA reaches."""
    full = [r for r in finished if r.get("method") == "full" and r.get("exact_match") is not None]
    if not full or not baseline or baseline.get("exact_match") is None:
        return []
    base, best = baseline["exact_match"], max(full, key=lambda r: r["exact_match"])
    best_full = best["exact_match"]
    gain = best_full - base
    if gain <= 0:
        return [f"full fine-tuning did not improve exact match over the base model ({base:.1%})"]
    out = [f"full fine-tuning: exact match {base:.1%} → {best_full:.1%} ({best['name']})"]
    edge = _at_grid_edge(full, best)
    if edge:
        return [*out, edge]
    for record in finished:
        if record.get("method") == "lora" and record.get("exact_match") is not None:
            share = (record["exact_match"] - base) / gain
            out.append(
                f"{record['name']} reaches {share:.0%} of full fine-tuning's exact-match gain"
            )
    return out


def _at_grid_edge(full: list[dict[str, Any]], best: dict[str, Any]) -> str | None:
    """Why full fine-tuning may not be at its best: a single learning rate, or the best one at
    the edge of the grid (its optimum may lie beyond); None when the grid brackets it."""
    lrs = sorted({r.get("overrides", {}).get("train.lr") for r in full} - {None})
    lr = best.get("overrides", {}).get("train.lr")
    if len(lrs) < 3 or lr in (lrs[0], lrs[-1]):
        where = "a single learning rate" if len(lrs) < 3 else f"the edge of its grid (lr={lr})"
        return (
            f"full fine-tuning's best exact match is at {where}: it may not be at its best, so "
            "no share of its gain is given; add learning rates that bracket its optimum"
        )
    return None


def forgetting(finished: list[dict[str, Any]], baseline: dict | None) -> list[str]:
    """What each variant forgot: the general questions' loss and facts kept, against the base."""
    rows = [r for r in finished if r.get("general_loss") is not None]
    if not rows or not baseline or baseline.get("general_loss") is None:
        return []
    base_loss, base_facts = baseline["general_loss"], baseline.get("facts_kept", 0.0)
    parts = [
        f"{r['name']} {r['general_loss']:.3g} ({r.get('facts_kept', 0.0):.0%})"
        for r in sorted(rows, key=lambda r: r["general_loss"])
    ]
    return [
        f"forgetting (held-out general questions, the base model's own answers; facts kept in "
        f"brackets): base {base_loss:.3g} ({base_facts:.0%}); " + ", ".join(parts)
    ]


# ---------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_figures(folder: Path, sweep: Any, records: list[dict[str, Any]]) -> list[Path]:
    """score_vs_<axis>.png per numeric axis, params_vs_score.png, time_memory.png, curves.png,
    gap.png (eval loss minus train loss over the steps: overfitting shows as a rising line)."""
    finished = [r for r in records if r.get("status") == "finished"]
    if not finished:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    files = []
    for key in sweep.axes:
        if key != "variant" and _numeric_axis(finished, key):
            files.append(_score_vs_axis(plt, folder, finished, key))
    files.append(_params_vs_score(plt, folder, finished))
    files.append(_time_memory(plt, folder, finished))
    files.append(_curves(plt, folder, finished))
    if any(len(r.get("gap", [])) > 1 for r in finished):
        files.append(_gap(plt, folder, finished))
    return files


def _score_panels(finished: list[dict[str, Any]]) -> list[tuple[str, str]]:
    panels = [("best_eval_loss", "best eval loss")]
    if any(r.get("exact_match") is not None for r in finished):
        panels.append(("exact_match", "exact match"))
    return panels


def _score_vs_axis(plt, folder: Path, finished: list[dict[str, Any]], key: str) -> Path:
    panels = _score_panels(finished)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    name = key.rsplit(".", 1)[-1]
    values = [r["overrides"][key] for r in finished]
    log = min(values) > 0 and max(values) / min(values) >= 8
    for ax, (metric, label) in zip(axes[0], panels, strict=True):
        for group, rows in _groups(finished, key).items():
            rows = sorted(
                (r for r in rows if r.get(metric) is not None), key=lambda r: r["overrides"][key]
            )
            ax.plot(
                [r["overrides"][key] for r in rows],
                [r[metric] for r in rows],
                "o-",
                label=group or None,
            )
        if log:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(_groups(finished, key)) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / f"score_vs_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _params_vs_score(plt, folder: Path, finished: list[dict[str, Any]]) -> Path:
    panels = _score_panels(finished)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels, strict=True):
        rows = [r for r in finished if r.get(metric) is not None and r.get("trainable_params")]
        ax.scatter([r["trainable_params"] for r in rows], [r[metric] for r in rows])
        for r in rows:
            ax.annotate(
                r["name"],
                (r["trainable_params"], r[metric]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = folder / "params_vs_score.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _time_memory(plt, folder: Path, finished: list[dict[str, Any]]) -> Path:
    names = [r["name"] for r in finished]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.35 * len(names) + 1.6))
    left.barh(names, [r.get("train_s") or 0 for r in finished])
    left.set_xlabel("training time (s)")
    right.barh(names, [r.get("peak_memory_mb") or 0 for r in finished])
    right.set_xlabel("peak memory (MB)")
    right.set_yticklabels([])
    for ax in (left, right):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = folder / "time_memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(values: list[float], alpha: float = 0.8) -> list[float]:
    out, current = [], None
    for v in values:
        current = v if current is None else alpha * current + (1 - alpha) * v
        out.append(current)
    return out


def _style(plt, i: int) -> dict[str, str]:
    """Line colour and dash of the i-th variant: the colours, then again dashed, then dotted."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dashes = ["-", "--", ":"]
    return {"color": colors[i % len(colors)], "linestyle": dashes[i // len(colors) % 3]}


def _curves(plt, folder: Path, finished: list[dict[str, Any]]) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4))
    for i, record in enumerate(finished):
        style = _style(plt, i)
        train = record.get("curve", {}).get("train", [])
        evals = record.get("curve", {}).get("eval", [])
        if train:
            left.plot(
                [s for s, _ in train], _smooth([v for _, v in train]), **style, label=record["name"]
            )
        if evals:
            right.plot(
                [s for s, _ in evals],
                [v for _, v in evals],
                marker="o",
                **style,
                label=record["name"],
            )
    left.set_title("train loss (smoothed)")
    right.set_title("eval loss")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        values = [v for r in finished for _, v in r["curve"]["train"] if math.isfinite(v)]
        if values and min(values) > 0 and max(values) / min(values) > 10:  # spans a decade
            ax.set_yscale("log")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path = folder / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _gap(plt, folder: Path, finished: list[dict[str, Any]]) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, record in enumerate(finished):
        gap = record.get("gap", [])
        if gap:
            ax.plot(
                [s for s, _ in gap],
                [g for _, g in gap],
                marker="o",
                **_style(plt, i),
                label=record["name"],
            )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss − train loss")
    ax.set_title("generalisation gap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path = folder / "gap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
