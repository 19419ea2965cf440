"""The summary printed at the end of a training run."""

from __future__ import annotations

from .pipeline import TrainResult


def format_summary(result: TrainResult, *, dry_run: bool = False) -> str:
    """Return a plain-text summary of a run, one fact per line."""
    summary = result.summary
    lines = [
        f"Project:            {summary['source']}",
        f"Mode:               {summary['mode']} ({summary['filter_by']})",
        f"Assets:             {summary['assets']}",
        f"Flagged:            {summary['flagged']} ({summary['flagged'] / max(summary['assets'], 1):.1%})",
        f"CV accuracy:        {summary['cv_accuracy']:.2%} (out-of-fold prediction vs given label)",
    ]
    if summary["failed_images"]:
        lines.append(f"Unreadable images:  {summary['failed_images']} (skipped; see the log)")
    for reason, count in sorted(summary["skipped_labels"].items()):
        lines.append(f"Skipped labels:     {count} ({reason})")
    if summary["excluded_classes"]:
        lines.append(f"Excluded classes:   {', '.join(summary['excluded_classes'])}")
    lines.append("Estimated noise per class:")
    for name, rate in summary["estimated_noise_per_class"].items():
        lines.append(f"  {name:<24} {rate:6.1%}")
    cleaning = summary.get("cleaning")
    if cleaning:
        lines.append(
            f"CV accuracy after removing flagged: {cleaning['cv_accuracy_before']:.2%} "
            f"({cleaning['assets_before']} assets) -> {cleaning['cv_accuracy_after']:.2%} "
            f"({cleaning['assets_after']} assets)"
        )
    suffix = " (dry run: not made current)" if dry_run and "reused_version" not in summary else ""
    lines.append(f"Model version:      {result.version_dir}{suffix}")
    lines.append(f"Label issues:       {result.issues_csv}")
    if result.write_summary is not None:
        written = result.write_summary
        verb = "would write" if dry_run else "wrote"
        lines.append(
            f"Project results:    {verb} {written.written}, unchanged {written.unchanged}, failed {written.failed}"
        )
    lines.append(f"Time:               {summary['seconds']:.1f} s")
    return "\n".join(lines)


def print_summary(result: TrainResult, *, dry_run: bool = False) -> None:
    print(format_summary(result, dry_run=dry_run))
