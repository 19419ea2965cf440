"""A self-contained HTML review report of one model version.

The report reads a version folder (``manifest.json``, ``label_issues.csv``)
and writes one HTML file with the run summary, two plots (flagged assets by
given and suggested label, estimated noise per class) and the table of
suspects, most likely error first. The file loads nothing from the network:
CSS, JavaScript, plots and thumbnails are all embedded. Suspect rows are a
JSON block that a small script renders one page at a time, so a report with
10,000 suspects builds only one page of rows in the DOM at a time.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from plugin.model_version import MANIFEST
from plugin.preprocess import ImageDecodeError, decode_image

from .pipeline import ISSUES_CSV
from .sources.base import Asset, ProjectSource

logger = logging.getLogger(__name__)

REPORT_FILENAME = "report.html"
# Measured: a 96 px JPEG thumbnail is about 4.5 KB of base64 for the Intel scene
# photos and 7.5 KB for random noise (the worst case), so 2,000 add 9 to 15 MB.
DEFAULT_MAX_THUMBNAILS = 2000
DEFAULT_THUMBNAIL_PX = 96
DEFAULT_PAGE_SIZE = 100
# Above this many classes the heat map leaves out the per-cell counts, because they would not fit.
_MAX_ANNOTATED_CLASSES = 20
# Longer class names are cut in plot axes (the tables show them in full).
_MAX_PLOT_LABEL = 30


class ReportError(ValueError):
    """Error raised when a version folder cannot be read into a report. The message names the file and the fix."""


@dataclass
class Suspect:
    """One flagged asset as the report shows it."""

    rank: int
    asset_id: str
    given_label: str
    suggested_label: str
    score: float
    url: str | None = None
    thumbnail: str | None = None  # a data: URI


def render_report(
    version_dir: str | Path,
    *,
    source: ProjectSource | None = None,
    output: str | Path | None = None,
    thumbnails: bool = True,
    max_thumbnails: int = DEFAULT_MAX_THUMBNAILS,
    thumbnail_px: int = DEFAULT_THUMBNAIL_PX,
    page_size: int = DEFAULT_PAGE_SIZE,
    workers: int = 8,
) -> Path:
    """Write the HTML report of a version folder and return its path.

    ``source`` is the project the version was trained on. It provides the
    thumbnails (image bytes) and the links to assets in the labeling tool.
    Without it the report has neither. Only the first ``max_thumbnails``
    suspects get a thumbnail of at most ``thumbnail_px`` pixels per side.
    The default ``output`` is ``report.html`` in the version folder.
    """
    if max_thumbnails < 0:
        raise ValueError(f"invalid maximum thumbnail count {max_thumbnails}: use 0 or more")
    if not 16 <= thumbnail_px <= 512:
        raise ValueError(f"invalid thumbnail size {thumbnail_px} px: use 16 to 512 pixels")
    if page_size < 1:
        raise ValueError(f"invalid page size {page_size}: use 1 or more rows per page")

    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    display_names = {name: str(display) for name, display in (manifest.get("class_display_names") or {}).items()}
    suspects = read_suspects(version_dir / ISSUES_CSV)
    logger.info("Report of %s: %d suspects", manifest.get("version", version_dir.name), len(suspects))

    notes = []
    if source is not None:
        for suspect in suspects:
            suspect.url = _safe_url(source.asset_url(suspect.asset_id))
    if thumbnails and source is not None and suspects:
        notes.extend(_attach_thumbnails(suspects, source, max_thumbnails, thumbnail_px, workers))
    elif thumbnails and suspects:
        notes.append("No thumbnails: the report was made without the project "
                     "(pass --data PATH or --project-id ID to `kili-label-errors report`).")

    classes = list(manifest.get("classes") or [])
    metrics = manifest.get("metrics") or {}
    body = "\n".join([
        _summary_section(manifest, metrics, len(suspects), display_names),
        _plots_section(suspects, classes, metrics, display_names),
        _suspects_section(suspects, display_names, notes, page_size),
    ])
    title = f"Label errors: {manifest.get('source', '')} ({manifest.get('version', version_dir.name)})"
    document = _PAGE.format(title=html.escape(title), style=_STYLE, body=body, script=_SCRIPT)

    path = Path(output) if output else version_dir / REPORT_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    logger.info("Report written to %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


# Reading the version folder ---------------------------------------------------


def read_manifest(version_dir: Path) -> dict:
    path = version_dir / MANIFEST
    if not path.is_file():
        raise ReportError(f"no {MANIFEST} in {version_dir}: pass the folder of a complete model version")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON ({error}); retrain to write a new version") from error


def read_suspects(path: Path) -> list[Suspect]:
    """Read the flagged rows of ``label_issues.csv``, most likely error first."""
    if not path.is_file():
        raise ReportError(f"{path} not found: the version folder is incomplete, retrain to write a new version")
    suspects = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.DictReader(handle), start=2):
            try:
                if row["is_issue"].strip().lower() != "true":
                    continue
                suspects.append(Suspect(
                    rank=int(row["rank"]),
                    asset_id=row["asset_id"],
                    given_label=row["given_label"],
                    suggested_label=row["suggested_label"],
                    score=float(row["score"]),
                ))
            except (KeyError, ValueError, AttributeError) as error:
                raise ReportError(
                    f"{path} line {line_number}: invalid row ({error!r}); the file needs the columns "
                    "asset_id, given_label, suggested_label, score, is_issue, rank"
                ) from error
    suspects.sort(key=lambda suspect: suspect.rank)
    return suspects


# Thumbnails -------------------------------------------------------------------


def _attach_thumbnails(
    suspects: Sequence[Suspect], source: ProjectSource, max_thumbnails: int, thumbnail_px: int, workers: int
) -> list[str]:
    """Embed thumbnails of the first ``max_thumbnails`` suspects and return notes for the reader."""
    notes = []
    selected = suspects[:max_thumbnails]
    if len(suspects) > len(selected):
        notes.append(f"Thumbnails are shown for the first {len(selected)} of {len(suspects)} suspects "
                     f"(the limit is {max_thumbnails}).")
    if not selected:
        return notes

    assets = {asset.asset_id: asset for asset in source.list_assets()}
    missing = [suspect.asset_id for suspect in selected if suspect.asset_id not in assets]
    if missing:
        logger.warning("%d suspects are no longer in project %s, e.g. %s: they get no thumbnail",
                       len(missing), source.name, missing[0])
        notes.append(f"{len(missing)} suspects are no longer in the project and have no thumbnail.")

    def make(suspect: Suspect) -> str | None:
        asset = assets.get(suspect.asset_id)
        return None if asset is None else _thumbnail(source, asset, thumbnail_px)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        uris = list(pool.map(make, selected))
    failed = sum(1 for suspect, uri in zip(selected, uris) if uri is None and suspect.asset_id in assets)
    for suspect, uri in zip(selected, uris):
        suspect.thumbnail = uri
    if failed:
        notes.append(f"{failed} images could not be read and have no thumbnail (see the log).")
    return notes


def _thumbnail(source: ProjectSource, asset: Asset, thumbnail_px: int) -> str | None:
    try:
        image = decode_image(source.read_image(asset))
    except (OSError, ImageDecodeError) as error:
        logger.warning("No thumbnail for asset %s: %s", asset.asset_id, error)
        return None
    image.thumbnail((thumbnail_px, thumbnail_px))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _safe_url(url: str | None) -> str | None:
    """Keep only http(s) links, so an asset URL can never run script when clicked."""
    if url and url.lower().startswith(("https://", "http://")):
        return url
    return None


# Sections ---------------------------------------------------------------------


def _summary_section(manifest: dict, metrics: Mapping, flagged: int, display_names: Mapping[str, str]) -> str:
    assets = metrics.get("assets")
    facts = [
        ("Project", manifest.get("source", metrics.get("source", ""))),
        ("Model version", f"{manifest.get('version', '')} (created {manifest.get('created_at', 'at an unknown time')})"),
        ("Mode", f"{manifest.get('mode', metrics.get('mode', ''))}, flagged by {metrics.get('filter_by', '')}"),
        ("Assets", assets if assets is not None else "unknown"),
        ("Flagged", f"{flagged} ({flagged / assets:.1%})" if assets else flagged),
    ]
    if metrics.get("cv_accuracy") is not None:
        facts.append(("Cross-validated accuracy", f"{metrics['cv_accuracy']:.2%} (out-of-fold prediction vs given label)"))
    cleaning = metrics.get("cleaning")
    if cleaning:
        facts.append(("Accuracy after removing flagged",
                      f"{cleaning['cv_accuracy_before']:.2%} ({cleaning['assets_before']} assets) to "
                      f"{cleaning['cv_accuracy_after']:.2%} ({cleaning['assets_after']} assets)"))
    if metrics.get("failed_images"):
        facts.append(("Unreadable images", f"{metrics['failed_images']} (left out of training)"))
    for reason, count in sorted((metrics.get("skipped_labels") or {}).items()):
        facts.append(("Skipped labels", f"{count} ({reason})"))
    if metrics.get("excluded_classes"):
        facts.append(("Excluded classes", ", ".join(_display_label(name, display_names) for name in metrics["excluded_classes"])))
    if metrics.get("seconds") is not None:
        facts.append(("Time taken", f"{metrics['seconds']:.1f} s"))

    rows = "\n".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(str(value))}</td></tr>" for label, value in facts)
    noise = metrics.get("estimated_noise_per_class") or {}
    noise_rows = "\n".join(
        f"<tr><td>{html.escape(_display_label(name, display_names))}</td><td class='num'>{rate:.1%}</td></tr>"
        for name, rate in sorted(noise.items(), key=lambda item: -item[1])
    )
    noise_table = (
        f"<table class='noise'><thead><tr><th>Class</th><th>Estimated noise</th></tr></thead>"
        f"<tbody>{noise_rows}</tbody></table>" if noise else "<p>No noise estimate in this version.</p>"
    )
    return (f"<section id='summary'><h2>Summary</h2><div class='columns'>"
            f"<table class='facts'>{rows}</table>{noise_table}</div></section>")


def _plots_section(suspects: Sequence[Suspect], classes: Sequence[str], metrics: Mapping,
                   display_names: Mapping[str, str]) -> str:
    parts = ["<section id='plots'><h2>Where the errors are</h2><div class='columns'>"]
    if suspects:
        pairs = Counter((suspect.given_label, suspect.suggested_label) for suspect in suspects)
        parts.append(_image_tag(_heat_map_png(pairs, classes, display_names),
                                "Heat map: flagged assets by given label (rows) and suggested label (columns)"))
    else:
        parts.append("<p>No suspects, so there is no heat map.</p>")
    noise = metrics.get("estimated_noise_per_class") or {}
    if noise:
        parts.append(_image_tag(_noise_bars_png(noise, display_names), "Bar chart: estimated noise per class"))
    parts.append("</div>")
    if suspects:
        pairs = Counter((suspect.given_label, suspect.suggested_label) for suspect in suspects)
        items = "".join(
            f"<li>{html.escape(_display_label(given, display_names))} &rarr; {html.escape(_display_label(suggested, display_names))}: "
            f"{count}</li>"
            for (given, suggested), count in pairs.most_common(10)
        )
        parts.append(f"<h3>Most frequent pairs (given &rarr; suggested)</h3><ol class='pairs'>{items}</ol>")
    parts.append("</section>")
    return "\n".join(parts)


def _suspects_section(suspects: Sequence[Suspect], display_names: Mapping[str, str], notes: Sequence[str],
                      page_size: int) -> str:
    note_html = "".join(f"<p class='note'>{html.escape(note)}</p>" for note in notes)
    if not suspects:
        return ("<section id='suspects'><h2>Suspects</h2>"
                "<p id='no-suspects'>No suspects: cleanlab flagged no asset in this version.</p></section>")
    data = {
        "pageSize": page_size,
        "rows": [
            {
                "rank": suspect.rank,
                "id": suspect.asset_id,
                "given": _display_label(suspect.given_label, display_names),
                "suggested": _display_label(suspect.suggested_label, display_names),
                "score": round(suspect.score, 4),
                "url": suspect.url,
                "thumb": suspect.thumbnail,
            }
            for suspect in suspects
        ],
    }
    return f"""<section id='suspects'>
<h2>Suspects ({len(suspects)}), most likely error first</h2>
{note_html}
<p class='help'>The score is the label-quality score: low means the given label is likely wrong.</p>
<div class='controls'>
 <label>Filter <input id='filter' type='search' placeholder='asset id or label'></label>
 <button id='previous' type='button'>Previous</button>
 <span id='page-info'></span>
 <button id='next' type='button'>Next</button>
</div>
<table id='suspect-table'>
 <thead><tr><th>#</th><th>Image</th><th>Asset</th><th>Given label</th><th>Suggested label</th><th>Score</th></tr></thead>
 <tbody id='suspect-rows'></tbody>
</table>
<script type='application/json' id='suspect-data'>{_json_for_script(data)}</script>
</section>"""


def _display_label(name: str, display_names: Mapping[str, str]) -> str:
    display = display_names.get(name, name)
    return display if display == name else f"{display} ({name})"


def _json_for_script(data: object) -> str:
    """Serialize JSON that cannot close or confuse the <script> element that contains it."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


# Plots ------------------------------------------------------------------------


def _plot_label(name: str, display_names: Mapping[str, str]) -> str:
    # matplotlib reads text between two dollar signs as math, so the dollar signs of a class name are escaped.
    label = display_names.get(name, name)
    if len(label) > _MAX_PLOT_LABEL:
        label = label[: _MAX_PLOT_LABEL - 1] + "\u2026"
    return label.replace("$", r"\$")


def _heat_map_png(pairs: Counter, classes: Sequence[str], display_names: Mapping[str, str]) -> bytes:
    import numpy as np

    names = list(classes)
    for given, suggested in pairs:
        names.extend(name for name in (given, suggested) if name not in names)
    index = {name: position for position, name in enumerate(names)}
    counts = np.zeros((len(names), len(names)), dtype=np.int64)
    for (given, suggested), count in pairs.items():
        counts[index[given], index[suggested]] = count

    plt = _pyplot()
    side = min(14.0, 2.5 + 0.45 * len(names))
    figure, axes = plt.subplots(figsize=(side + 1.0, side))
    heat = axes.imshow(counts, cmap="Reds")
    labels = [_plot_label(name, display_names) for name in names]
    axes.set_xticks(range(len(names)), labels, rotation=60, ha="right")
    axes.set_yticks(range(len(names)), labels)
    axes.set_xlabel("Suggested label")
    axes.set_ylabel("Given label")
    axes.set_title("Flagged assets: given vs suggested label")
    if len(names) <= _MAX_ANNOTATED_CLASSES:
        limit = counts.max() / 2
        for row, column in zip(*np.nonzero(counts)):
            axes.text(column, row, str(counts[row, column]), ha="center", va="center",
                      color="white" if counts[row, column] > limit else "black", fontsize=9)
    figure.colorbar(heat, ax=axes, shrink=0.8, label="flagged assets")
    return _png(figure)


def _noise_bars_png(noise: Mapping[str, float], display_names: Mapping[str, str]) -> bytes:
    ordered = sorted(noise.items(), key=lambda item: item[1])
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.5, min(14.0, 1.5 + 0.35 * len(ordered))))
    # Numeric positions with tick labels: class names such as "0" must stay names, not numbers.
    positions = range(len(ordered))
    axes.barh(positions, [100 * rate for _, rate in ordered], color="#c0392b")
    axes.set_yticks(positions, [_plot_label(name, display_names) for name, _ in ordered])
    axes.set_xlabel("Estimated wrong labels (% of the class)")
    axes.set_title("Estimated noise per given class")
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ReportError("the report's plots need matplotlib, which is not installed: pip install matplotlib") from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    _pyplot().close(figure)
    return buffer.getvalue()


def _image_tag(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f"<img class='plot' alt='{html.escape(alt)}' src='data:image/png;base64,{encoded}'>"


# Page template ----------------------------------------------------------------

# The policy blocks every network request, so the report works the same offline.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
{body}
<script>{script}</script>
</body>
</html>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
h1 { font-size: 1.4em; word-break: break-all; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; }
th, td { padding: 0.3em 0.6em; text-align: left; vertical-align: middle; }
.facts th { color: #555; font-weight: normal; }
.noise td, .noise th, #suspect-table td, #suspect-table th { border-bottom: 1px solid #eee; }
.num, .score { text-align: right; font-variant-numeric: tabular-nums; }
.columns { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eee; }
#suspect-table img { display: block; width: 64px; height: 64px; object-fit: contain; background: #f4f4f4; }
.asset { word-break: break-all; max-width: 28em; }
.given { color: #a93226; } .suggested { color: #1e8449; font-weight: bold; }
.note { background: #fef9e7; padding: 0.4em 0.6em; }
.controls { margin: 0.6em 0; display: flex; gap: 0.8em; align-items: center; }
"""

# Rows are built with textContent and DOM nodes, never innerHTML, so no label
# or asset id is ever parsed as HTML.
_SCRIPT = """
(function () {
  var holder = document.getElementById('suspect-data');
  if (!holder) { return; }
  var data = JSON.parse(holder.textContent);
  var rows = data.rows, visible = rows, page = 0, size = data.pageSize;
  var body = document.getElementById('suspect-rows');
  var info = document.getElementById('page-info');
  var previous = document.getElementById('previous'), next = document.getElementById('next');

  function cell(row, text, className) {
    var td = document.createElement('td');
    if (text !== null) { td.textContent = text; }
    if (className) { td.className = className; }
    row.appendChild(td);
    return td;
  }

  function render() {
    var pages = Math.max(1, Math.ceil(visible.length / size));
    page = Math.min(Math.max(page, 0), pages - 1);
    body.textContent = '';
    visible.slice(page * size, (page + 1) * size).forEach(function (item) {
      var tr = document.createElement('tr');
      tr.className = 'suspect';
      cell(tr, String(item.rank), 'num');
      var image = cell(tr, null, 'thumb');
      if (item.thumb) {
        var img = document.createElement('img');
        img.src = item.thumb; img.alt = 'asset ' + item.id; img.loading = 'lazy';
        image.appendChild(img);
      } else {
        image.textContent = '-';
      }
      var asset = cell(tr, null, 'asset');
      if (item.url) {
        var link = document.createElement('a');
        link.href = item.url; link.textContent = item.id; link.target = '_blank'; link.rel = 'noopener';
        asset.appendChild(link);
      } else {
        asset.textContent = item.id;
      }
      cell(tr, item.given, 'given');
      cell(tr, item.suggested, 'suggested');
      cell(tr, item.score.toFixed(4), 'score');
      body.appendChild(tr);
    });
    info.textContent = 'Page ' + (page + 1) + ' of ' + pages + ' (' + visible.length + ' rows)';
    previous.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }

  previous.addEventListener('click', function () { page -= 1; render(); });
  next.addEventListener('click', function () { page += 1; render(); });
  document.getElementById('filter').addEventListener('input', function (event) {
    var query = event.target.value.trim().toLowerCase();
    visible = !query ? rows : rows.filter(function (item) {
      return (item.id + ' ' + item.given + ' ' + item.suggested).toLowerCase().indexOf(query) >= 0;
    });
    page = 0;
    render();
  });
  render();
})();
"""
