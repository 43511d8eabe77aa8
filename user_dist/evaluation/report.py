"""What a person reads: a metrics table for the terminal and an HTML page.

The page is self-contained (no network, no files beside it): the metrics per
protocol, for a few test images their top-5 captions (correct ones, the image's
own whatever their number, marked), for a few captions their top-5 images (a JPEG thumbnail embedded in the page
when pictures are at hand, user_dist.evaluation.thumbnails; else the image's
label and first caption), and recall@K curves for both directions as inline
SVG. The examples are evenly spaced over the split, so the pages of
successive checkpoints show the same queries. A page may show several sets
of towers of one checkpoint (online and momentum) side by side.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from user_dist.atomic import atomic_write
from user_dist.evaluation.extended import EXTENDED
from user_dist.evaluation.metrics import (CAPTIONS_PER_IMAGE, METRIC_KEYS, Counts, ProtocolError, caption_owners,
                                          check_counts, i2t_ranks, recall_curve, t2i_ranks)
from user_dist.evaluation.thumbnails import ReportImages

TOP = 5
CURVE_MAX_K = 50


def format_table(results: Dict[str, dict]) -> str:
    """A plain-text table, one row per protocol: recalls and rsum (percent), ranks;
    then the extended metrics' table when results hold them."""
    header = ["protocol", *METRIC_KEYS]
    rows = [[p, *(f"{m[k]:.1f}" if k.endswith(("medr", "meanr")) else f"{m[k]:.2f}" for k in METRIC_KEYS)]
            for p, m in results.items() if p != EXTENDED]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths))
                      for r in [header, ["-" * w for w in widths], *rows])
    return table + ("\n\n" + format_extended(results[EXTENDED]) if EXTENDED in results else "")


def _extended_rows(extended: Dict[str, float]) -> List[Tuple[str, str, str]]:
    """(metric, i2t, t2i) of the extended metrics present, e.g. ('ECCV mAP@R', '23.99', '31.96')."""
    names = {"eccv_{}_map_at_r": "ECCV mAP@R", "eccv_{}_rprecision": "ECCV R-Precision", "eccv_{}_r1": "ECCV R@1",
             "cxc_{}_r1": "CxC R@1", "cxc_{}_r5": "CxC R@5", "cxc_{}_r10": "CxC R@10", "pmrp_{}": "PMRP"}
    return [(name, f"{extended[key.format('i2t')]:.2f}", f"{extended[key.format('t2i')]:.2f}")
            for key, name in names.items() if key.format("i2t") in extended]


def format_extended(extended: Dict[str, float]) -> str:
    """The ECCV Caption / CxC / PMRP metrics (percent) as a plain-text table, one row per metric."""
    rows = [("COCO 5K, extended positives", "i2t", "t2i"), *_extended_rows(extended)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)


def extended_html(extended: Optional[Dict[str, float]], suffix: str = "") -> str:
    """The report's section for the ECCV Caption / CxC / PMRP metrics ('' without them);
    ``suffix`` names the set of towers, e.g. " (momentum towers)"."""
    if not extended:
        return ""
    cells = "".join(f"<tr><td>{html.escape(n)}</td><td>{a}</td><td>{b}</td></tr>" for n, a, b in
                    _extended_rows(extended))
    return (f"<h2>COCO 5K with extended positives{html.escape(suffix)}</h2>"
            "<p>In percent. ECCV Caption (mAP@R, R-Precision, R@1) "
            "and CxC (R@K) count machine- and human-verified extra matches as correct, PMRP (R-Precision) "
            "plausible matches; see docs/evaluation.md.</p>"
            f"<table><tr><th>metric</th><th>image to text</th><th>text to image</th></tr>{cells}</table>")


def example_queries(count: int, n: int) -> np.ndarray:
    """``count`` indices spread evenly over 0..n-1 (the same for every checkpoint)."""
    return np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(np.int64))


def top_k(scores: np.ndarray, k: int = TOP) -> np.ndarray:
    """Indices of the k highest scores, best first (ties: lower index first)."""
    k = min(k, scores.shape[0])
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


def recall_svg(curves: Dict[str, np.ndarray], width: int = 420, height: int = 260) -> str:
    """Inline SVG of recall (percent) against K = 1..len(curve), one polyline per curve."""
    pad, colors = 40, ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
    max_k = max(len(c) for c in curves.values())
    x = lambda k: pad + (width - 2 * pad) * (k - 1) / max(max_k - 1, 1)  # noqa: E731
    y = lambda r: height - pad - (height - 2 * pad) * r / 100.0  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="recall at K">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{y(0)}" x2="{width - pad}" y2="{y(0)}" stroke="black"/>',
             f'<line x1="{pad}" y1="{y(0)}" x2="{pad}" y2="{y(100)}" stroke="black"/>']
    for r in (0, 50, 100):
        parts.append(f'<text x="{pad - 4}" y="{y(r) + 4}" font-size="10" text-anchor="end">{r}</text>')
    for k in sorted({1, 5, 10, max_k}):
        parts.append(f'<text x="{x(k):.1f}" y="{y(0) + 14}" font-size="10" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 6}" font-size="11" text-anchor="middle">K</text>')
    for i, (name, curve) in enumerate(curves.items()):
        pts = " ".join(f"{x(k + 1):.1f},{y(v):.1f}" for k, v in enumerate(curve))
        color = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}">'
                     f'<title>{html.escape(name)}</title></polyline>')
        parts.append(f'<text x="{pad + 8}" y="{pad + 14 * i}" font-size="11" fill="{color}">'
                     f'{html.escape(name)}: R@1 {curve[0]:.1f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


@dataclass
class TowerScores:
    """One set of towers' scores of the split, as the page shows them.

    name: "online" or "momentum" ("" for a page that does not say).
    results: protocol -> metrics dict (METRIC_KEYS).
    sims: (N, C) image x caption scores of the whole split (columns laid out by the
        page's caption_counts, render_html).
    ranks: (i2t (N,), t2i (C,)) 0-based ranks over the whole split when the
        caller has them (the evaluation job counts them on the device); None:
        counted here with numpy.
    """

    name: str
    results: Dict[str, dict]
    sims: np.ndarray
    ranks: Optional[Tuple[np.ndarray, np.ndarray]] = None


def shown_images(sims: Sequence[np.ndarray], examples: int) -> List[int]:
    """Split positions of every image the page shows for these matrices (the
    image queries and the caption queries' top-5 images), sorted: the only
    pictures worth reading."""
    n = sims[0].shape[0]
    shown = set(example_queries(examples, n).tolist())
    for s in sims:
        for j in example_queries(examples, s.shape[1]):
            shown.update(top_k(s[:, j]).tolist())
    return sorted(shown)


def _image_cell(k: int, labels: Sequence[str], first_captions: Sequence[str], images: Optional[ReportImages]) -> str:
    """Image k as its picture, else its label and first caption (first_captions[k])."""
    if images is not None and k in images.uris:
        return f'<img src="{images.uris[k]}" alt="image {k}" title="{html.escape(labels[k])}">'
    return f"<b>{html.escape(labels[k])}</b><br><small>{html.escape(first_captions[k])}</small>"


def _images_note(shown: Sequence[int], images: Optional[ReportImages]) -> str:
    """One line on where the pictures come from, and how many shown images have none."""
    if not shown:
        return ""
    if images is None:
        return ("<p>No pictures at hand for this split: images are shown by their label and first caption "
                "(the evaluation job's <code>--images-from</code> names a jpg shard folder of the split).</p>")
    missing = [k for k in shown if k not in images.uris]
    note = f"<p>Pictures from <code>{html.escape(images.source)}</code>"
    if missing:
        note += (f"; {len(missing)} of the {len(shown)} images shown have no picture there "
                 "(shown by label and first caption)")
    return note + ".</p>"


def _examples(scores: TowerScores, ranks: Tuple[np.ndarray, np.ndarray], suffix: str, captions: Sequence[str],
              owner: np.ndarray, labels: Sequence[str], images: Optional[ReportImages], examples: int) -> List[str]:
    """The two example tables of one set of towers: image queries' top-5 captions, captions' top-5 images.

    owner (C,): the image of each caption (metrics.caption_owners).
    """
    esc, sims, (ri, rt) = html.escape, scores.sims, ranks
    n = sims.shape[0]
    first_captions = [captions[j] for j in np.searchsorted(owner, np.arange(n))]
    out = [f"<h2>Image to text: top-5 captions{suffix}</h2><table>"]
    for k in example_queries(examples, n):
        out.append(f'<tr><td class="q">{_image_cell(k, labels, first_captions, images)}'
                   f"<br>rank of its best caption: {ri[k] + 1}</td>")
        for j in top_k(sims[k]):
            ok = owner[j] == k
            out.append(f'<td class="{"ok" if ok else "no"}">{"&#10003; " if ok else ""}{esc(captions[j])}'
                       f"<br><small>{sims[k, j]:.3f}</small></td>")
        out.append("</tr>")
    out.append(f"</table><h2>Text to image: top-5 images{suffix}</h2><table>")
    for j in example_queries(examples, sims.shape[1]):
        out.append(f'<tr><td class="q">{esc(captions[j])}<br>rank of its image: {rt[j] + 1}</td>')
        for k in top_k(sims[:, j]):
            ok = k == owner[j]
            out.append(f'<td class="{"ok" if ok else "no"}">{"&#10003; " if ok else ""}'
                       f"{_image_cell(k, labels, first_captions, images)}"
                       f"<br><small>{sims[k, j]:.3f}</small></td>")
        out.append("</tr>")
    out.append("</table>")
    return out


def render_html(title: str, results: Dict[str, dict], sims: np.ndarray, captions: Sequence[str],
                image_labels: Sequence[str], images: Optional[ReportImages] = None,
                examples: int = 5, ranks: Optional[Tuple[np.ndarray, np.ndarray]] = None, *,
                towers: str = "", more: Sequence[TowerScores] = (), caption_counts: Counts = None) -> str:
    """The report page.

    Args:
        results, sims, ranks: the first set of towers' scores (TowerScores), sims (N, C).
        captions: C caption texts in the matrix's column order; image_labels: N names (keys or "image #k").
        images: pictures of (some of) the shown images (thumbnails.report_images),
            or None when there are none at hand.
        examples: image queries and caption queries shown.
        towers: the first set's name ("online", "momentum"); said on the page
            unless it is "" or the only set is "online" (the default page).
        more: further sets of towers of the same split, shown after the first.
        caption_counts: (N,) captions per image, image k's the n_k columns after those of
            images 0..k-1 (metrics.evaluate); None: 5 per image.
    """
    sets = [TowerScores(towers, results, sims, ranks), *more]
    n, c = sims.shape
    if caption_counts is not None:
        try:
            check_counts(sims.shape, caption_counts, "report")
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None
    elif c != CAPTIONS_PER_IMAGE * n:
        raise ValueError(f"report: a {sims.shape} similarity matrix does not hold {CAPTIONS_PER_IMAGE} captions per "
                         "image; give its caption_counts")
    if len(captions) != c or len(image_labels) != n:
        raise ValueError(f"report: {len(captions)} captions and {len(image_labels)} image labels given for a "
                         f"{sims.shape} similarity matrix; expected {c} and {n}")
    owner = caption_owners(caption_counts, c)
    named = len(sets) > 1 or towers not in ("", "online")
    suffix = {s.name: f" ({s.name} towers)" if named else "" for s in sets}
    esc = html.escape
    out: List[str] = [
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "vertical-align:top}td.ok{background:#dff0d8}td.no{background:#fff}.q{background:#f4f4f4}</style>",
        f"</head><body><h1>{esc(title)}</h1>",
        "<h2>Metrics</h2>",
        "<p>Recalls and rsum in percent; ranks 1-based. A wrong item tied with the correct one "
        "counts as ranked above it.</p><table><tr><th>protocol</th>",
        *(f"<th>{k}</th>" for k in METRIC_KEYS), "</tr>",
    ]
    for p in sets[0].results:  # one protocol's rows together: the sets of towers side by side
        if p == EXTENDED:
            continue
        for s in sets:
            if p in s.results:
                m = s.results[p]
                out.append(f"<tr><td>{esc(p + suffix[s.name])}</td>"
                           + "".join(f"<td>{m[k]:.2f}</td>" for k in METRIC_KEYS) + "</tr>")
    out.append("</table>")
    out += [extended_html(s.results.get(EXTENDED), suffix[s.name]) for s in sets]

    all_ranks = [s.ranks if s.ranks is not None else
                 (i2t_ranks(s.sims, caption_counts), t2i_ranks(s.sims, caption_counts)) for s in sets]
    worst_i2t = c - int(np.bincount(owner, minlength=n).min()) + 1  # 1-based: every wrong caption above
    curves = {}
    for s, (ri, rt) in zip(sets, all_ranks):
        curves["image to text" + suffix[s.name]] = recall_curve(ri, min(CURVE_MAX_K, worst_i2t))
        curves["text to image" + suffix[s.name]] = recall_curve(rt, min(CURVE_MAX_K, n))
    out += [f"<h2>Recall@K over the whole split ({n} images)</h2>", recall_svg(curves)]
    out.append(_images_note(shown_images([s.sims for s in sets], examples), images))
    for s, r in zip(sets, all_ranks):
        out += _examples(s, r, suffix[s.name], captions, owner, image_labels, images, examples)
    out.append("</body></html>")
    return "\n".join(out)


def write_report(path: str, *args, **kwargs) -> None:
    """render_html(...) written atomically to ``path``."""
    atomic_write(path, render_html(*args, **kwargs))
