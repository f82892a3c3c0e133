"""The files of an explanation folder, written into its staging folder.

Images: ``sample-INDEX.png`` (the input beside its signed heatmap, with the labels), ``grid.png``
(the heatmaps of the first 64 samples), ``summary.png`` (per target class, the mean absolute
attribution map).
Text: ``explanation.html`` (one self-contained page, every token coloured by its attribution,
HTML-escaped) and ``summary.csv`` (per target class, the most influential words with counts).
Both: ``attributions.npz`` (inputs, attributions, feature ids, classes, curves; ``true`` is -1 and
``input`` the file's name for samples from ``--input`` files) and ``explain.json`` (the result, as
``--json`` prints it). Samples from files are shown by their name and with no true label.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path, PurePath

import numpy as np
import torch

from dlkit.spec import IMAGE

TOP_WORDS = 20  # words per class in summary.csv
GRID_MAX = 64  # samples in grid.png (every sample has its own PNG)


def write_all(work: Path, result, records: list[dict], spec, state: dict) -> list[str]:
    """Write every file into ``work``; returns their names."""
    names = [str(c) for c in (spec.class_names or range(spec.num_classes))]
    if spec.modality == IMAGE:
        files = _images(work, result, records, names, state)
    else:
        files = _text(work, result, records, names, state)
    _npz(work / "attributions.npz", records)
    files.append("attributions.npz")
    files.append("explain.json")
    result.files = sorted(files)
    doc = result.to_dict()
    doc.pop("folder")  # known only once the folder is in place
    doc.pop("seconds")
    (work / "explain.json").write_text(json.dumps(doc, indent=2, default=str))
    return result.files


def _npz(path: Path, records: list[dict]) -> None:
    arrays = {
        "index": np.array([r["explanation"].index for r in records]),
        "inputs": torch.stack([r["x"] for r in records]).numpy(),
        "attributions": torch.stack([r["scores"] for r in records]).float().numpy(),
        "features": torch.stack([r["units"] for r in records]).numpy(),
        "target": np.array([r["target"] for r in records]), "prediction": np.array([r["pred"] for r in records]),
        "true": np.array([-1 if r["y"] is None else r["y"] for r in records]),
        "input": np.array([r["explanation"].input or "" for r in records]),
        "deletion": _ragged([r["curves"].deletion for r in records]),
        "insertion": _ragged([r["curves"].insertion for r in records]),
        "random_deletion": _ragged([r["curves"].random_deletion for r in records]),
        "random_insertion": _ragged([r["curves"].random_insertion for r in records]),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path.write_bytes(buf.getvalue())


def _ragged(rows: list[list[float]]) -> np.ndarray:
    """Curves of different lengths (texts of different lengths) as one array padded with NaN."""
    width = max(len(r) for r in rows)
    return np.array([r + [math.nan] * (width - len(r)) for r in rows])


# ------------------------------------------------------------------------------------- images


def _pixels(x: torch.Tensor, state: dict) -> np.ndarray:
    """A normalised (C, H, W) input back to displayable (H, W) or (H, W, 3) values in [0, 1]."""
    mean, std = state.get("mean"), state.get("std")
    if mean is not None and std is not None:
        img = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        img = (x - x.min()) / (float(x.max() - x.min()) or 1.0)
    img = img.clamp(0, 1).numpy()
    return img[0] if img.shape[0] == 1 else np.transpose(img[:3], (1, 2, 0))


def _heat(scores: torch.Tensor) -> tuple[np.ndarray, float]:
    """The per-pixel attribution (channels summed) and a symmetric colour limit."""
    heat = scores.sum(0).float().numpy()
    limit = float(np.abs(heat).max()) or 1.0
    return heat, limit


def _show(ax, r: dict, state: dict, with_heat: bool) -> None:
    img = _pixels(r["x"], state)
    gray = img if img.ndim == 2 else img.mean(-1)
    ax.imshow(gray if with_heat else img, cmap="gray", vmin=0, vmax=1)
    if with_heat:
        heat, limit = _heat(r["scores"])
        ax.imshow(heat, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.6)
    ax.set_xticks([])
    ax.set_yticks([])


def who(e) -> str:
    """How a sample is named: ``#INDEX true LABEL`` (test split), or its file's name (--input)."""
    if e.input is None:
        return f"#{e.index} true {e.true}"
    return PurePath(e.input).name or e.input  # the file, not its folders: PNG titles are short


def _title(r: dict) -> str:
    e = r["explanation"]
    return (f"{who(e)}, predicted {e.prediction} ({e.probability:.0%})\n"
            f"explaining {e.target}: deletion AUC {e.deletion_auc:.2f} (random {e.random_deletion_auc:.2f})")


def _images(work: Path, result, records: list[dict], names: list[str], state: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for r in records:
        fig, axes = plt.subplots(1, 2, figsize=(6, 3.4))
        _show(axes[0], r, state, with_heat=False)
        axes[0].set_title("input", fontsize=8)
        _show(axes[1], r, state, with_heat=True)
        axes[1].set_title(f"{result.method} (red: for, blue: against)", fontsize=8)
        fig.suptitle(_title(r), fontsize=8)
        name = f"sample-{r['explanation'].index:04d}.png"
        fig.savefig(work / name, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    shown = records[:GRID_MAX]
    cols = min(len(shown), 4)
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        _show(ax, r, state, with_heat=True)
        ax.axis("on")
        e = r["explanation"]
        ax.set_title(f"{who(e)} -> {e.prediction} ({e.probability:.0%})", fontsize=7)
    more = f" (the first {len(shown)} of {len(records)})" if len(shown) < len(records) else ""
    fig.suptitle(f"{result.model}: {result.method}, baseline {result.baseline}{more}", fontsize=9)
    fig.savefig(work / "grid.png", format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    files.append("grid.png")
    files.append(_image_summary(work, result, records, names, plt))
    return files


def _image_summary(work: Path, result, records: list[dict], names: list[str], plt) -> str:
    by_class: dict[int, list[np.ndarray]] = defaultdict(list)
    for r in records:
        by_class[r["target"]].append(np.abs(r["scores"].sum(0).float().numpy()))
    classes = sorted(by_class)
    fig, axes = plt.subplots(1, len(classes), figsize=(2.4 * len(classes), 2.8), squeeze=False)
    for ax, c in zip(axes[0], classes):
        ax.imshow(np.mean(by_class[c], axis=0), cmap="magma")
        ax.set_title(f"{names[c]} ({len(by_class[c])} samples)", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"mean |attribution| per explained class ({result.method})", fontsize=9)
    fig.savefig(work / "summary.png", format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "summary.png"


# ------------------------------------------------------------------------------------- text


def tokens(ids: torch.Tensor, vocab: list[str]) -> list[tuple[int, str]]:
    """(position, word) of every token that is not padding."""
    return [(p, vocab[i] if i < len(vocab) else f"#{i}") for p, i in enumerate(ids.tolist()) if i != 0]


def _colour(score: float, limit: float) -> str:
    alpha = min(1.0, abs(score) / limit) if limit > 0 else 0.0
    rgb = "34, 139, 34" if score >= 0 else "214, 39, 40"
    return f"rgba({rgb}, {alpha:.3f})"


def token_html(ids: torch.Tensor, scores: torch.Tensor, vocab: list[str]) -> str:
    """The tokens of one text as coloured spans: green for the target, red against; escaped."""
    toks = tokens(ids, vocab)
    limit = max((abs(float(scores[p])) for p, _ in toks), default=0.0)
    return " ".join(f'<span class="t" style="background: {_colour(float(scores[p]), limit)}" '
                    f'title="{float(scores[p]):+.4g}">{html.escape(w)}</span>' for p, w in toks)


def _text(work: Path, result, records: list[dict], names: list[str], state: dict) -> list[str]:
    vocab = (state.get("tokenizer") or {}).get("vocab") or []
    e = html.escape
    parts = []
    for r in records:
        x = r["explanation"]
        head = f"#{x.index}: true {e(x.true)}" if x.input is None else e(x.input)
        parts.append(
            f'<section><h2>{head}, predicted {e(x.prediction)} ({x.probability:.1%}); '
            f'explaining {e(x.target)} ({x.target_probability:.1%})</h2>\n'
            f'<p class="text">{token_html(r["x"], r["scores"], vocab)}</p>\n'
            f'<p class="q">deletion AUC {x.deletion_auc:.3f} (random {x.random_deletion_auc:.3f}), '
            f'insertion AUC {x.insertion_auc:.3f} (random {x.random_insertion_auc:.3f})</p></section>')
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{e(result.model)}: {e(result.method)}</title>\n"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}h2{font-size:1em}"
        ".text{line-height:2}.t{padding:0.1em 0.2em;border-radius:0.2em}.q{color:#555;font-size:0.9em}</style>"
        f"</head><body>\n<h1>{e(result.model)}: {e(result.method)}, baseline {e(result.baseline)}</h1>\n"
        "<p>Green tokens speak for the explained class, red ones against it (hover for the score).</p>\n"
        + "\n".join(parts) + "\n</body></html>\n")
    (work / "explanation.html").write_text(page, encoding="utf-8")
    _word_summary(work / "summary.csv", records, names, vocab)
    return ["explanation.html", "summary.csv"]


def _word_summary(path: Path, records: list[dict], names: list[str], vocab: list[str]) -> None:
    """Per explained class, the words with the largest total attribution, and how often they came."""
    totals: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in records:
        for p, w in tokens(r["x"], vocab):
            totals[(r["target"], w)].append(float(r["scores"][p]))
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["class", "word", "count", "total_attribution", "mean_attribution"])
    for c in sorted({c for c, _ in totals}):
        words = sorted(((w, v) for (k, w), v in totals.items() if k == c), key=lambda wv: (-sum(wv[1]), wv[0]))
        for w, v in words[:TOP_WORDS]:
            out.writerow([names[c], w, len(v), f"{sum(v):.6g}", f"{sum(v) / len(v):.6g}"])
    path.write_text(buf.getvalue(), encoding="utf-8")
