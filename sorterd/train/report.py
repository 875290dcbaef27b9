"""The evaluation report: one self-contained HTML page with embedded PNG plots.

What a person wants to see first is at the top: the §8.4 verdict (green or
red), the headline figures against the §8.3 Phase 3 and Stretch rows, then
the pictures -- confusion matrices as heatmaps, reliability diagrams with the
§5.2 gates, per-lot and per-class bars, the hard cases, where stones went
(true bin x chosen bin, coloured by §8.2 cost) -- and finally the costliest
mistakes as crops, so a grader can see *why*.

matplotlib (the ``train`` extra) is imported inside `write_report`, with the
non-interactive Agg backend: nothing here needs a display.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sorterd.data.dataset import Dataset, StoneLabel, read_crop
from sorterd.data.samples import INPUT_CACHE, load_samples
from sorterd.domain import BINS, CLASSES, COST, LIGHT_MODES
from sorterd.train.evaluate import ECE_TARGET, MILESTONES, Evaluation, short_warning

GALLERY = 24  # costliest mistakes shown
RECHECK_CONFIDENCE = 0.95  # a model this sure against the label often means a labelling slip
THUMB_PX = 96
GOOD, BAD, MUTED = "#2e7d32", "#c62828", "#757575"


def write_report(ev: Evaluation, ds: Dataset, out_dir: Path, title: str = "Model evaluation",
                 subtitle: str = "") -> Path:
    """Write out_dir/report.html (+ metrics.json and the PNGs); return the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    m = ev.metrics
    figures = [
        ("Colour and clarity confusion", _fig_confusions(m),
         "Rows: the label; columns: what the model said. Colour shows the share of each row, numbers are stones."),
        ("All nine classes", _fig_combined(m), "The 9×9 colour×clarity confusion, row-normalised."),
        ("Calibration", _fig_reliability(m),
         "Reliability diagrams: bars are the accuracy of stones at that confidence, the diagonal is perfect "
         "calibration. Below: how many stones sit at each confidence; dashed lines are the §5.2 gates "
         "(< 0.50 → SELECT, < 0.80 → flagged)."),
        ("Where the stones went", _fig_bins(m),
         "True bin (§8.2, with the 2 mm CUT rule) against the bin the sorter would choose with the §5.2 gates. "
         "Red cells cost money: the shade is count × §8.2 cost."),
        ("Per lot", _fig_per_lot(m), "Held-out lots side by side; dashed lines are the §8.3 Phase 3 targets."),
        ("Per class", _fig_per_class(m), "Both heads right, per labelled class; the line is the §8.4 70 % floor."),
        ("Hard cases", _fig_subsets(m),
         "§6 hard cases against clean stones: accuracy against the (noisy) label, and how often flagged."),
    ]
    for i, (_, png, _) in enumerate(figures):
        (out_dir / f"fig{i + 1}.png").write_bytes(png)
    (out_dir / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    page = _page(m, title, subtitle, figures, _gallery(ev, ds))
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# -- figures ------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _heatmap(ax: Any, matrix: np.ndarray, labels: list[str], title: str, fontsize: int = 10) -> None:
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=fontsize,
                    color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("label")
    ax.set_title(title)


def _fig_confusions(m: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2))
    for ax, key, name in zip(axes, ("color", "clarity"), ("Colour", "Clarity"), strict=True):
        c = m["confusion"][key]
        _heatmap(ax, np.array(c["matrix"]), c["labels"], f"{name}: {_pct(m[key])} right", fontsize=12)
    fig.tight_layout()
    return _png(fig)


def _fig_combined(m: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    c = m["confusion"]["combined"]
    _heatmap(ax, np.array(c["matrix"]), [lab.replace("_", "\n") for lab in c["labels"]],
             f"Colour × clarity: {_pct(m['overall'])} both right", fontsize=8)
    ax.set_xticks(range(9), [lab.replace("_", " ") for lab in c["labels"]], rotation=45, ha="right")
    ax.set_yticks(range(9), [lab.replace("_", " ") for lab in c["labels"]])
    return _png(fig)


def _fig_reliability(m: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 5.6), gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    names = {"color": "Colour head", "clarity": "Clarity head", "combined": "Combined (§5.2): both right"}
    for col, key in enumerate(("color", "clarity", "combined")):
        bins = [b for b in m["reliability"].get(key, []) if b["count"]]
        top, bottom = axes[0, col], axes[1, col]
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        width = (bins[0]["hi"] - bins[0]["lo"]) * 0.92 if bins else 0.09
        top.bar(centres, [b["accuracy"] for b in bins], width=width, color="#5b8def", label="accuracy")
        top.plot(centres, [b["confidence"] for b in bins], "o", color=BAD, ms=5, label="mean confidence")
        for x, b in zip(centres, bins, strict=True):  # the gap, bin by bin
            top.plot([x, x], [b["accuracy"], b["confidence"]], color=BAD, lw=1.5)
        top.plot([0, 1], [0, 1], color="black", lw=1, ls="--")
        top.set_ylim(0, 1.02)
        ece = m["ece"].get(key)
        top.set_title(f"{names[key]}: ECE {'n/a' if ece is None else f'{ece:.3f}'}", fontsize=10)
        top.set_ylabel("accuracy")
        bottom.bar(centres, [b["count"] for b in bins], width=width, color=MUTED)
        bottom.set_yscale("symlog")
        bottom.set_xlabel("confidence")
        bottom.set_ylabel("stones")
        bottom.set_xlim(0.3, 1.0)  # the top of three probabilities is never below 1/3
        if key == "combined":
            for ax in (top, bottom):
                ax.axvline(0.5, color=BAD, ls=":", lw=1.2)
                ax.axvline(0.8, color="#ef6c00", ls=":", lw=1.2)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _fig_bins(m: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    counts = np.array(m["bins"]["matrix"])
    cost = counts * COST
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    shade = np.where(cost > 0, 0.25 + 0.75 * cost / max(float(cost.max()), 1.0), 0.0)
    rgb = np.ones((4, 4, 3))
    rgb[..., 1] -= shade
    rgb[..., 2] -= shade
    diag = np.eye(4, dtype=bool)
    rgb[diag] = [0.85, 0.94, 0.85]
    ax.imshow(rgb)
    for (i, j), v in np.ndenumerate(counts):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=12)
    ax.set_xticks(range(4), BINS)
    ax.set_yticks(range(4), BINS)
    ax.set_xlabel("sorter's bin (with confidence gates)")
    ax.set_ylabel("true bin")
    ax.set_title(f"Cost-weighted accuracy {m['cost_weighted']}")
    return _png(fig)


def _fig_per_lot(m: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    lots = list(m["per_lot"])
    keys = (("overall", "overall", "#1565c0"), ("color", "colour", "#42a5f5"), ("clarity", "clarity", "#90caf9"))
    targets = dict(zip(("overall", "color", "clarity"), MILESTONES["Phase 3"][:3], strict=True))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(lots) + 2), 4.2))
    x = np.arange(len(lots))
    for k, (key, name, colour) in enumerate(keys):
        vals = [m["per_lot"][lot][key] or 0.0 for lot in lots]
        bars = ax.bar(x + (k - 1) * 0.27, vals, width=0.26, color=colour, label=name)
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.005, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(targets[key], color=colour, ls="--", lw=1)
    ax.set_xticks(x, [f"{lot}\n(n={m['per_lot'][lot]['n_classified']})" for lot in lots])
    low = min([m["per_lot"][lot][k] or 1.0 for lot in lots for k, _, _ in keys] + [0.9])
    ax.set_ylim(max(0.0, low - 0.08), 1.0)
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Accuracy per lot")
    return _png(fig)


def _fig_per_class(m: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    pc = m["per_class"]
    vals = [pc[c]["accuracy"] if pc[c]["accuracy"] is not None else 0.0 for c in CLASSES]
    colours = [BAD if pc[c]["n"] and v < 0.7 else (MUTED if pc[c]["n"] < 10 else "#1565c0")
               for c, v in zip(CLASSES, vals, strict=True)]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    bars = ax.bar(range(9), vals, color=colours)
    for b, c, v in zip(bars, CLASSES, vals, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{100 * v:.0f}%\nn={pc[c]['n']}", ha="center",
                va="bottom", fontsize=7)
    ax.axhline(0.7, color=BAD, ls="--", lw=1)
    ax.set_xticks(range(9), [c.replace("_", "\n") for c in CLASSES], fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("both heads right")
    ax.set_title("Accuracy per class (grey: fewer than 10 stones)")
    return _png(fig)


def _fig_subsets(m: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    names = [k for k, v in m["subsets"].items() if v["n"]]
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    x = np.arange(len(names))
    acc = [m["subsets"][k]["accuracy"] for k in names]  # None for non-gem: it has no class
    flag = [m["subsets"][k]["flagged_rate"] or 0.0 for k in names]
    b1 = ax.bar(x - 0.2, [a or 0.0 for a in acc], width=0.38, color="#1565c0", label="accuracy vs label")
    b2 = ax.bar(x + 0.2, flag, width=0.38, color="#ef6c00", label="flagged for review")
    for bars, values in ((b1, acc), (b2, flag)):
        for b, v in zip(bars, values, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, (v or 0.0) + 0.01, "no class" if v is None else f"{100 * v:.0f}%",
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"{k}\n(n={m['subsets'][k]['n']})" for k in names], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Hard cases (§6) vs clean stones")
    return _png(fig)


# -- gallery ------------------------------------------------------------------------------


def _gallery(ev: Evaluation, ds: Dataset) -> list[dict[str, str]]:
    """The costliest mistakes, most expensive and most confident first."""
    rows = []
    for i, (lab, t, d) in enumerate(zip(ev.labels, ev.true_bin, ev.decided_bin, strict=True)):
        if t is None:
            continue
        pc, pk = ev.p_color[i], ev.p_clarity[i]
        wrong_class = lab.classified and (int(pc.argmax()) != lab.color_index or int(pk.argmax()) != lab.clarity_index)
        cost = int(COST[BINS.index(t), BINS.index(d)])
        if cost or wrong_class:
            rows.append((cost, float(ev.confidence[i]), i))
    rows.sort(key=lambda r: (-r[0], -r[1]))
    out = []
    for cost, conf, i in rows[:GALLERY]:
        lab = ev.labels[i]
        thumbs = [_thumb(image) for image in _stone_images(ev, ds, lab)]
        said = f"{('blue', 'light', 'inky')[int(ev.p_color[i].argmax())]} " \
               f"{('transparent', 'translucent', 'opaque')[int(ev.p_clarity[i].argmax())]}"
        label = "non-gem" if lab.reject else f"{lab.color} {lab.clarity}"
        flags = ", ".join(sorted(lab.flags))
        if conf >= RECHECK_CONFIDENCE and lab.classified:
            flags = " · ".join(f for f in (flags, "confident disagreement: re-check the label (§5.3)") if f)
        flags = flags or "—"
        out.append({"id": lab.stone_id, "lot": lab.lot_id, "label": label, "said": said,
                    "bins": f"{ev.true_bin[i]} → {ev.decided_bin[i]}", "cost": str(cost), "conf": f"{conf:.2f}",
                    "flags": flags, "notes": lab.notes, "backlit": thumbs[0], "toplit": thumbs[1]})
    return out


def _stone_images(ev: Evaluation, ds: Dataset, lab: StoneLabel) -> list[np.ndarray]:
    """(backlit, toplit) BGR of a stone: its processed crops, else (raw frames only) its input as
    cut from its raw frames with the evaluation's window."""
    if ds.image_path("backlit", lab.stone_id).is_file():
        return [read_crop(ds, lab, mode) for mode in LIGHT_MODES]
    kept, x, report = load_samples(ds, [lab], ev.input_size, ev.crop_mm, "raw", ds.root / INPUT_CACHE)
    if not kept:  # it was judged, so it was cut once: only a changed dataset gets here
        raise ValueError(f"stone {lab.stone_id}: its input can no longer be cut from its raw frames "
                         f"({report.skipped_text()})")
    return [np.ascontiguousarray(x[0, :, :, 2::-1]), np.ascontiguousarray(x[0, :, :, :2:-1])]


def _thumb(image: np.ndarray) -> str:
    small = cv2.resize(image, (THUMB_PX, THUMB_PX), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", small)
    return base64.b64encode(buf.tobytes()).decode() if ok else ""


# -- page -----------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _page(m: dict[str, Any], title: str, subtitle: str, figures: list[tuple[str, bytes, str]],
          gallery: list[dict[str, str]]) -> str:
    v = m["verdict"]
    banner_colour = GOOD if v["ready"] else BAD
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>",
        f"<div class='banner' style='background:{banner_colour}'>{html.escape(v['summary'])}</div>",
        *([f"<div class='banner' style='background:{BAD}'>{html.escape(short)}</div>"]
          if (short := short_warning(m)) else []),
        *([f"<p class='cap'>{html.escape(m['inputs']['summary'])}</p>"] if m.get("inputs") else []),
        _cards(m),
        _milestone_table(m),
        _criteria_table(v),
    ]
    for name, png, caption in figures:
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><p class='cap'>{html.escape(caption)}</p>"
                     f"<img class='fig' src='data:image/png;base64,{data}' alt='{html.escape(name)}'>")
    parts.append(_gallery_html(gallery))
    parts.append(f"<p class='cap'>Stones: {m['n_stones']} ({m['n_classified']} classified, {m['n_reject']} "
                 f"non-gem). Figures as JSON: metrics.json.</p></body></html>")
    return "\n".join(parts)


def _cards(m: dict[str, Any]) -> str:
    p3, st = MILESTONES["Phase 3"], MILESTONES["Stretch"]
    items = [
        ("Overall", m["overall"], p3[0], st[0], True), ("Colour", m["color"], p3[1], st[1], True),
        ("Clarity", m["clarity"], p3[2], st[2], True), ("Cost-weighted", m["cost_weighted"], p3[3], st[3], True),
        ("Flagged", m["flagged_rate"], p3[4], st[4], False), ("CUT purity", m["cut_purity"], 0.95, None, True),
        ("CUT recall", m["cut_recall"], 0.85, None, True),
        ("ECE (worst head)", _worst_ece(m), ECE_TARGET, None, False),
    ]
    cells = []
    for name, value, target, stretch, higher in items:
        ok = value is not None and (value >= target if higher else value <= target)
        shown = f"{value:.3f}" if name in ("Cost-weighted", "ECE (worst head)") and value is not None else _pct(value)
        goal = ("≥ " if higher else "≤ ") + (f"{target:.2f}" if target < 1 and name in ("Cost-weighted", "ECE (worst head)")
                                          else f"{100 * target:.0f} %")
        if stretch is not None:
            goal += f" · stretch {('≥ ' if higher else '≤ ')}{stretch if name == 'Cost-weighted' else f'{100 * stretch:.0f} %'}"
        cells.append(f"<div class='card' style='border-color:{GOOD if ok else BAD}'><div class='k'>{name}</div>"
                     f"<div class='v' style='color:{GOOD if ok else BAD}'>{shown}</div><div class='t'>{goal}</div></div>")
    return "<div class='cards'>" + "".join(cells) + "</div>"


def _worst_ece(m: dict[str, Any]) -> float | None:
    vals = [m["ece"].get(k) for k in ("color", "clarity")]
    return max(vals) if all(v is not None for v in vals) else None  # type: ignore[type-var]


def _milestone_table(m: dict[str, Any]) -> str:
    rows = m["milestones"]["rows"]
    head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in next(iter(rows.values()))["checks"])
    body = []
    for phase, row in rows.items():
        cells = "".join(
            f"<td class='{'ok' if c['pass'] else 'no'}'>{'≤' if key == 'flagged_rate' else '≥'} {c['target']}</td>"
            for key, c in row["checks"].items())
        body.append(f"<tr><th>{phase}</th>{cells}<td class='{'ok' if row['met'] else 'no'}'>"
                    f"{'met' if row['met'] else 'not met'}</td></tr>")
    reached = m["milestones"]["reached"] or "none"
    return (f"<h2>§8.3 milestones — reached: {html.escape(reached)}</h2><table><tr><th></th>{head}<th></th></tr>"
            + "".join(body) + "</table>")


def _criteria_table(v: dict[str, Any]) -> str:
    rows = []
    for c in v["criteria"]:
        state = "ok" if c["pass"] else ("no" if c["pass"] is False else "na")
        word = {"ok": "pass", "no": "FAIL", "na": "not measured"}[state]
        value = "—" if c["value"] is None else f"{c['value']:.4f}"
        note = html.escape(c.get("note", ""))
        rows.append(f"<tr><td>{html.escape(c['name'])}</td><td>{value}</td><td class='{state}'>{word}</td>"
                    f"<td class='cap'>{note}</td></tr>")
    return ("<h2>§8.4 production readiness</h2><table><tr><th>criterion</th><th>value</th><th></th><th></th></tr>"
            + "".join(rows) + "</table>")


def _gallery_html(gallery: list[dict[str, str]]) -> str:
    if not gallery:
        return "<h2>Costliest mistakes</h2><p>None: every stone went to its right bin with the right class.</p>"
    cells = []
    for g in gallery:
        cells.append(
            f"<div class='g'><img src='data:image/png;base64,{g['backlit']}'><img src='data:image/png;base64,"
            f"{g['toplit']}'><div><b>{g['id']}</b> {html.escape(g['lot'])}</div>"
            f"<div>label: {html.escape(g['label'])}</div><div>model: {html.escape(g['said'])} ({g['conf']})</div>"
            f"<div>{html.escape(g['bins'])}, cost {g['cost']}</div>"
            f"<div class='cap'>{html.escape(g['flags'])} {html.escape(g['notes'])}</div></div>")
    return ("<h2>Costliest mistakes</h2><p class='cap'>Backlit | toplit crops, most expensive (§8.2) first. "
            "Flags and notes are the annotator's.</p><div class='gallery'>" + "".join(cells) + "</div>")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:24px auto;padding:0 16px;color:#212121}
h1{margin-bottom:0}.sub{color:#616161;margin-top:4px}
.banner{color:white;font-size:1.15em;padding:12px 16px;border-radius:6px;margin:16px 0}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:10px}
.card{border:2px solid;border-radius:6px;padding:8px 12px}.k{color:#616161;font-size:.9em}
.v{font-size:1.8em;font-weight:600}.t{color:#757575;font-size:.8em}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #e0e0e0;padding:4px 10px;text-align:left}
td.ok{background:#e8f5e9;color:#2e7d32}td.no{background:#ffebee;color:#c62828}td.na{color:#757575}
.cap{color:#616161;font-size:.9em}.fig{max-width:100%;border:1px solid #eee}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:10px}
.g{border:1px solid #e0e0e0;border-radius:6px;padding:6px;font-size:.85em}.g img{width:96px;height:96px;margin-right:4px}
"""
