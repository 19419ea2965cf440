"""A Kili image-classification project as a ``ProjectSource``.

Reading: the classes are the category keys of one single-choice (radio)
CLASSIFICATION job of the project's ``jsonInterface``, in interface order.
Each asset's label is its latest REVIEW label, else its latest DEFAULT label;
PREDICTION, INFERENCE and AUTOSAVE labels are ignored. Assets without a usable
label are counted in ``read_summary`` by reason.

Writing: the tool's metadata keys are merged into each asset's current
``jsonMetadata``, keeping foreign keys, and written with
``update_properties_in_assets``. Flagged assets get a review priority. When
requested, they are also sent to review and get an issue on their label.
docs/kili.md describes the options.

The label and job logic are plain functions; every SDK call goes through
``KiliGateway``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from plugin.metadata import (
    DEFAULT_KEY_PREFIX,
    FLAGGED,
    MODEL_VERSION,
    SCORE,
    SUGGESTED_LABEL,
    clear_metadata,
    merge_metadata,
    metadata_changed,
    owned_keys,
)

from .base import Asset, AssetResult, ProjectSource, SourceError, WriteSummary
from .kili_gateway import WRITE_BATCH_SIZE, ImageDownloader, KiliApiError, KiliGateway

logger = logging.getLogger(__name__)

SINGLE_CHOICE_INPUTS = ("radio", "singleDropdown")
MULTI_CHOICE_INPUTS = ("checkbox", "multipleDropdown")
# Labels written by people; PREDICTION, INFERENCE and AUTOSAVE labels never count.
REVIEW, DEFAULT = "REVIEW", "DEFAULT"
# Planned changes listed one per line in a dry run; the rest are counted.
DRY_RUN_LISTED = 20

# Skip reasons, as shown in the run summary.
SKIP_NO_LABEL = "no DEFAULT or REVIEW label"
SKIP_EMPTY_RESPONSE = "empty jsonResponse"
SKIP_NO_CATEGORY = "no category chosen in the job"
SKIP_SEVERAL_CATEGORIES = "several categories in a single-choice job"


@dataclass(frozen=True)
class ClassificationJob:
    """One CLASSIFICATION job of a project interface."""

    name: str
    input_type: str
    categories: tuple[str, ...]  # category keys, in interface order
    display_names: Mapping[str, str] = field(default_factory=dict)
    is_child: bool = False

    @property
    def single_choice(self) -> bool:
        return self.input_type in SINGLE_CHOICE_INPUTS


def classification_jobs(json_interface: Mapping | None) -> list[ClassificationJob]:
    """Return the CLASSIFICATION jobs of a ``jsonInterface``, in interface order."""
    jobs = []
    for name, job in ((json_interface or {}).get("jobs") or {}).items():
        if not isinstance(job, Mapping) or job.get("mlTask") != "CLASSIFICATION":
            continue
        content = job.get("content") or {}
        categories = content.get("categories") or {}
        jobs.append(ClassificationJob(
            name=name,
            input_type=str(content.get("input", "")),
            categories=tuple(categories),
            display_names={key: str((value or {}).get("name") or key) for key, value in categories.items()},
            is_child=bool(job.get("isChild")),
        ))
    return jobs


def choose_job(jobs: Sequence[ClassificationJob], requested: str | None, project_id: str) -> ClassificationJob:
    """Pick the job to check: ``requested``, else the only top-level single-choice job."""
    def listing(candidates: Sequence[ClassificationJob]) -> str:
        return ", ".join(f"{job.name} ({job.input_type})" for job in candidates) or "none"

    if requested:
        by_name = {job.name: job for job in jobs}
        if requested not in by_name:
            raise SourceError(
                f"job {requested!r} is not a classification job of project {project_id}; "
                f"its classification jobs are: {listing(jobs)}. Pass one of them with --job."
            )
        job = by_name[requested]
        if job.input_type in MULTI_CHOICE_INPUTS:
            raise SourceError(
                f"job {requested!r} of project {project_id} is a multi-choice ({job.input_type}) job, which is "
                "not supported yet: only single-choice (radio) jobs can be checked. Pick another job with --job."
            )
        if not job.single_choice:
            raise SourceError(
                f"job {requested!r} of project {project_id} has input type {job.input_type!r}; "
                f"only single-choice jobs ({', '.join(SINGLE_CHOICE_INPUTS)}) can be checked"
            )
        return _check_categories(job, project_id)

    candidates = [job for job in jobs if job.single_choice and not job.is_child]
    if not candidates:
        multi = [job for job in jobs if job.input_type in MULTI_CHOICE_INPUTS]
        later = " Multi-choice (checkbox) jobs are not supported yet." if multi else ""
        raise SourceError(
            f"project {project_id} has no single-choice (radio) classification job "
            f"(classification jobs: {listing(jobs)}).{later} "
            "Add a single-choice classification job to the interface, or use another project."
        )
    if len(candidates) > 1:
        raise SourceError(
            f"project {project_id} has several single-choice classification jobs: {listing(candidates)}. "
            "Pick one with --job NAME."
        )
    return _check_categories(candidates[0], project_id)


def _check_categories(job: ClassificationJob, project_id: str) -> ClassificationJob:
    if len(job.categories) < 2:
        raise SourceError(
            f"job {job.name!r} of project {project_id} has {len(job.categories)} categories; "
            "label-error detection needs at least two"
        )
    return job


def label_that_counts(labels: Sequence[Mapping] | None) -> Mapping | None:
    """Return the latest REVIEW label, else the latest DEFAULT label, else None."""
    for label_type in (REVIEW, DEFAULT):
        candidates = [label for label in labels or [] if label.get("labelType") == label_type]
        if candidates:
            return max(candidates, key=lambda label: str(label.get("createdAt") or ""))
    return None


def label_category(label: Mapping, job: ClassificationJob) -> tuple[str | None, str | None]:
    """Return ``(category, None)`` for a usable label or ``(None, skip reason)``.

    Raise ``SourceError`` for a category that the job does not define, since
    that means the interface and the labels disagree and no result can be trusted.
    """
    response = label.get("jsonResponse") or {}
    if not response:
        return None, SKIP_EMPTY_RESPONSE
    answer = response.get(job.name)
    if not answer:
        return None, f"job {job.name} missing from the label"
    categories = [item.get("name") for item in answer.get("categories") or [] if isinstance(item, Mapping)]
    if not categories:
        return None, SKIP_NO_CATEGORY
    if len(categories) > 1:
        return None, SKIP_SEVERAL_CATEGORIES
    category = categories[0]
    if category not in job.categories:
        raise SourceError(
            f"label {label.get('id', '?')} uses category {category!r}, which job {job.name!r} does not define "
            f"(categories: {', '.join(job.categories)}). Fix the label in Kili or add the category to the interface."
        )
    return category, None


def content_key(url: str) -> str:
    """Return what identifies an asset's content in its URL: the path, plus Kili's file ``id``.

    Signatures and tokens in the query change between reads of the same
    content, so they are left out.
    """
    parsed = urlparse(url)
    file_id = parse_qs(parsed.query).get("id", [""])[0]
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path}?id={file_id}" if file_id else f"{parsed.scheme}://{parsed.netloc}{parsed.path}"


@dataclass
class _KnownAsset:
    content: str
    metadata: dict
    label_id: str
    category: str


@dataclass
class WritePlan:
    """The changes of one write: new metadata per asset, priorities and newly flagged assets."""

    metadata: dict[str, dict] = field(default_factory=dict)
    priorities: dict[str, int] = field(default_factory=dict)
    newly_flagged: list[str] = field(default_factory=list)
    unchanged: int = 0


class KiliProject(ProjectSource):
    """One single-choice classification job of a Kili image project."""

    def __init__(
        self,
        gateway: KiliGateway,
        project_id: str,
        *,
        job: str | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        cache_dir: str | Path | None = None,
        send_to_review: bool = False,
        create_issues: bool = False,
        downloader: ImageDownloader | None = None,
    ) -> None:
        super().__init__()
        self.gateway = gateway
        self.project_id = project_id
        self.name = f"Kili project {project_id}"
        self.key_prefix = key_prefix
        self.send_to_review = send_to_review
        self.create_issues = create_issues
        self.cache_dir = Path(cache_dir) / project_id if cache_dir else None
        self.downloader = downloader or ImageDownloader(gateway.endpoint, gateway.api_key)
        #: Counts of Kili's succeeded, declined and failed outcomes and of created issues, from the last write.
        self.outcomes: Counter[str] = Counter()
        self._known: dict[str, _KnownAsset] = {}

        project = gateway.project(project_id)
        if project is None:
            raise SourceError(
                f"Kili project {project_id!r} not found, or this API key has no access to it: "
                "check --project-id (the id in the project's URL) and the key's owner"
            )
        self.title = project.get("title") or project_id
        self.workflow_version = project.get("workflowVersion") or "V1"
        if project.get("inputType") != "IMAGE":
            raise SourceError(
                f"Kili project {project_id} has input type {project.get('inputType')!r}; "
                "only IMAGE projects can be checked. Pick an image classification project."
            )
        jobs = classification_jobs(project.get("jsonInterface"))
        self.job = choose_job(jobs, job, project_id)
        logger.info(
            "Kili project %s (%s): job %s with %d categories, workflow %s",
            project_id, self.title, self.job.name, len(self.job.categories), self.workflow_version,
        )

    @classmethod
    def from_arguments(cls, args) -> KiliProject:
        """Build the source from the command-line arguments."""
        gateway = KiliGateway(api_key=args.api_key, api_endpoint=args.api_endpoint)
        cache_root = getattr(args, "cache_dir", None) or Path(getattr(args, "models_dir", ".")) / "cache"
        return cls(
            gateway,
            args.project_id,
            job=args.job,
            key_prefix=getattr(args, "key_prefix", DEFAULT_KEY_PREFIX),
            cache_dir=Path(cache_root) / "kili-images",
            send_to_review=getattr(args, "review", False),
            create_issues=getattr(args, "create_issues", False),
        )

    # Reading ---------------------------------------------------------------

    def classes(self) -> list[str]:
        return list(self.job.categories)

    def class_display_names(self) -> dict[str, str]:
        return dict(self.job.display_names)

    def _asset_fields(self) -> list[str]:
        fields = ["id", "externalId", "content", "jsonMetadata",
                  "labels.id", "labels.labelType", "labels.createdAt", "labels.jsonResponse"]
        if self.workflow_version == "V1":
            return fields + ["status"]
        return fields + ["currentStep.name", "currentStep.status"]

    def list_assets(self) -> Iterator[Asset]:
        self._known.clear()
        statuses: Counter[str] = Counter()
        for record in self.gateway.iter_assets(self.project_id, self._asset_fields()):
            asset_id = record["id"]
            step = record.get("currentStep") or {}
            statuses[record.get("status") or f"{step.get('name')}/{step.get('status')}"] += 1
            label = label_that_counts(record.get("labels"))
            if label is None:
                self.read_summary.skip(SKIP_NO_LABEL)
                continue
            category, reason = label_category(label, self.job)
            if category is None:
                logger.debug("Skipping asset %s: %s", asset_id, reason)
                self.read_summary.skip(reason)
                continue
            self._known[asset_id] = _KnownAsset(
                content=record.get("content") or "",
                metadata=dict(record.get("jsonMetadata") or {}),
                label_id=label.get("id") or "",
                category=category,
            )
            yield Asset(asset_id=asset_id, label=category, location=record.get("content") or "",
                        external_id=record.get("externalId") or "")
        logger.info("Kili assets by status: %s", dict(statuses))

    def read_image(self, asset: Asset) -> bytes:
        url = asset.location or (self._known[asset.asset_id].content if asset.asset_id in self._known else "")
        if not url:
            raise OSError(f"asset {asset.asset_id} has no content URL")
        cached = self._cached_image(asset.asset_id, url)
        if cached is not None:
            return cached
        data = self.downloader.download(url)
        self._store_image(asset.asset_id, url, data)
        return data

    def _index_path(self, asset_id: str) -> Path:
        assert self.cache_dir is not None
        safe = asset_id if re.fullmatch(r"[A-Za-z0-9_-]{1,100}", asset_id) else hashlib.sha256(asset_id.encode()).hexdigest()
        return self.cache_dir / "assets" / f"{safe}.json"

    def _blob_path(self, sha256: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / "blobs" / sha256[:2] / sha256

    def _cached_image(self, asset_id: str, url: str) -> bytes | None:
        """Return the cached bytes when the asset's content URL is unchanged and the checksum matches."""
        if self.cache_dir is None:
            return None
        try:
            entry = json.loads(self._index_path(asset_id).read_text())
            if entry.get("content_key") != content_key(url):
                return None
            data = self._blob_path(entry["sha256"]).read_bytes()
        except (OSError, ValueError, KeyError):
            return None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            logger.warning("Ignoring a corrupt cached image of asset %s", asset_id)
            return None
        return data

    def _store_image(self, asset_id: str, url: str, data: bytes) -> None:
        if self.cache_dir is None:
            return
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            blob = self._blob_path(sha256)
            if not blob.is_file():
                blob.parent.mkdir(parents=True, exist_ok=True)
                temporary = blob.with_name(f"{blob.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                temporary.write_bytes(data)
                temporary.replace(blob)
            index = self._index_path(asset_id)
            index.parent.mkdir(parents=True, exist_ok=True)
            index.write_text(json.dumps({"content_key": content_key(url), "sha256": sha256}))
        except OSError as error:
            logger.warning("Cannot cache the image of asset %s in %s: %s", asset_id, self.cache_dir, error)

    def _current_state(self) -> dict[str, dict]:
        """Read every asset's current metadata and label id from Kili."""
        fields = ["id", "jsonMetadata", "labels.id", "labels.labelType", "labels.createdAt"]
        state = {}
        for record in self.gateway.iter_assets(self.project_id, fields):
            label = label_that_counts(record.get("labels"))
            state[record["id"]] = {
                "metadata": dict(record.get("jsonMetadata") or {}),
                "label_id": (label or {}).get("id") or "",
            }
        return state

    def read_results(self, asset_ids: Sequence[str] | None = None) -> dict[str, dict]:
        if self._known:
            metadata = {asset_id: known.metadata for asset_id, known in self._known.items()}
        else:
            metadata = {asset_id: entry["metadata"] for asset_id, entry in self._current_state().items()}
        keys = set(owned_keys(self.key_prefix))
        wanted = None if asset_ids is None else set(asset_ids)
        results = {}
        for asset_id, values in metadata.items():
            ours = {key: value for key, value in values.items() if key in keys}
            if ours and (wanted is None or asset_id in wanted):
                results[asset_id] = ours
        return results

    # Writing ---------------------------------------------------------------

    def plan_write(self, results: Sequence[AssetResult], current: Mapping[str, dict]) -> WritePlan:
        """Work out what changes: merged metadata, priorities and newly flagged assets.

        Only assets whose verdict changed get a new priority, so a rerun with
        unchanged results sends nothing. An asset the tool flagged before and
        no longer flags gets priority 0 back.
        """
        plan = WritePlan()
        flagged_key, suggested_key = self.key_prefix + FLAGGED, self.key_prefix + SUGGESTED_LABEL
        for result in results:
            if result.asset_id not in current:
                logger.warning("Asset %s is no longer in project %s; its result is not written", result.asset_id, self.project_id)
                continue
            before = current[result.asset_id]
            merged = merge_metadata(before, result.metadata, prefix=self.key_prefix)
            if not self._verdict_changed(before, merged):
                plan.unchanged += 1
                continue
            plan.metadata[result.asset_id] = merged
            flagged_now = merged.get(flagged_key) is True
            flagged_before = before.get(flagged_key) is True
            if flagged_now:
                plan.priorities[result.asset_id] = result.priority
                if not flagged_before or before.get(suggested_key) != merged.get(suggested_key):
                    plan.newly_flagged.append(result.asset_id)
            elif flagged_before:
                plan.priorities[result.asset_id] = 0
        return plan

    def _verdict_changed(self, before: Mapping[str, object], merged: Mapping[str, object]) -> bool:
        """Tell whether ``merged`` changes the verdict stored in ``before``.

        ``metadata_changed`` ignores the time and the model version, because
        every training run exports a new version, and score moves under 0.01.
        """
        return metadata_changed(before, merged, prefix=self.key_prefix)

    def write_results(self, results: Sequence[AssetResult], *, dry_run: bool = False) -> WriteSummary:
        summary = WriteSummary(dry_run=dry_run)
        self.outcomes = Counter()
        state = self._current_state()
        plan = self.plan_write(results, {asset_id: entry["metadata"] for asset_id, entry in state.items()})
        summary.unchanged = plan.unchanged
        if dry_run:
            self._print_plan(plan)
            summary.written = len(plan.metadata)
            return summary
        if not plan.metadata:
            return summary

        self._declare_score_property()
        failed_ids = self._write_metadata(plan.metadata, summary)
        summary.written = len(plan.metadata) - len(failed_ids)

        by_priority: dict[int, list[str]] = defaultdict(list)
        for asset_id, priority in plan.priorities.items():
            if asset_id not in failed_ids:
                by_priority[priority].append(asset_id)
        for priority, asset_ids in sorted(by_priority.items()):
            self._count_outcome("priority", self.gateway.set_priority(self.project_id, priority, asset_ids), summary)

        flagged = [asset_id for asset_id in plan.newly_flagged if asset_id not in failed_ids]
        if flagged and self.send_to_review:
            self._count_outcome("review", self.gateway.add_to_review(self.project_id, flagged), summary)
        if flagged and self.create_issues:
            self._open_issues(flagged, plan.metadata, state, summary)
        return summary

    def _write_metadata(self, metadata: Mapping[str, dict], summary: WriteSummary) -> set[str]:
        """Write metadata in batches; return the ids of the assets whose batch failed."""
        failed: set[str] = set()
        asset_ids = list(metadata)
        for start in range(0, len(asset_ids), WRITE_BATCH_SIZE):
            batch = asset_ids[start : start + WRITE_BATCH_SIZE]
            try:
                self.gateway.update_metadata(batch, [metadata[asset_id] for asset_id in batch])
            except KiliApiError as error:
                logger.error("Metadata write of %d assets (first %s) failed: %s", len(batch), batch[0], error)
                summary.errors.append(str(error))
                summary.failed += len(batch)
                failed.update(batch)
                continue
            for asset_id in batch:
                if asset_id in self._known:
                    self._known[asset_id].metadata = metadata[asset_id]
        logger.info("Wrote metadata of %d assets to Kili project %s", len(asset_ids) - len(failed), self.project_id)
        return failed

    def _count_outcome(self, action: str, outcome: Mapping, summary: WriteSummary) -> None:
        """Log and count the assets that Kili declined or failed for an asset action."""
        for kind in ("declined", "failed"):
            entries = outcome.get(kind) or []
            if not entries:
                continue
            self.outcomes[f"{action}_{kind}"] += len(entries)
            ids = ", ".join(str(entry.get("assetId")) for entry in entries[:5])
            more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
            message = f"Kili {kind} {action} for {len(entries)} assets ({ids}{more})"
            details = {entry.get("details") for entry in entries if entry.get("details")}
            if details:
                message += f": {'; '.join(sorted(details))}"
            (logger.warning if kind == "failed" else logger.info)(message)
            summary.errors.append(message)
        self.outcomes[f"{action}_succeeded"] += len(outcome.get("succeeded") or [])

    def _open_issues(self, asset_ids: Sequence[str], metadata: Mapping[str, dict], state: Mapping[str, dict], summary: WriteSummary) -> None:
        label_ids, texts = [], []
        for asset_id in asset_ids:
            label_id = state.get(asset_id, {}).get("label_id")
            if not label_id:
                logger.warning("Asset %s has no DEFAULT or REVIEW label to open an issue on", asset_id)
                continue
            label_ids.append(label_id)
            texts.append(self.issue_text(metadata[asset_id], asset_id))
        if not label_ids:
            return
        try:
            created = self.gateway.create_issues(self.project_id, label_ids, texts)
        except KiliApiError as error:
            logger.error("Creating %d issues failed: %s", len(label_ids), error)
            summary.errors.append(str(error))
            self.outcomes["issues_failed"] += len(label_ids)
            return
        self.outcomes["issues_created"] += len(created)
        logger.info("Opened %d issues in Kili project %s", len(created), self.project_id)

    def issue_text(self, metadata: Mapping[str, object], asset_id: str) -> str:
        """Return the issue text for a flagged label: the expected class and the label's score."""
        names = self.job.display_names
        suggested = str(metadata.get(self.key_prefix + SUGGESTED_LABEL, ""))
        known = self._known.get(asset_id)
        given = f" instead of {names.get(known.category, known.category)}" if known else ""
        score = metadata.get(self.key_prefix + SCORE)
        score_text = f"{float(score):.2f}" if isinstance(score, (int, float)) else "unknown"
        return (
            f"Possible label error: the model expects {names.get(suggested, suggested)}{given}. "
            f"Label-quality score {score_text} (0 = likely wrong, 1 = likely right), "
            f"model version {metadata.get(self.key_prefix + MODEL_VERSION, '?')}."
        )

    def _declare_score_property(self) -> None:
        """Declare the score key as a number in the project, so reviewers can filter by range."""
        key = self.key_prefix + SCORE
        properties = self.gateway.metadata_properties(self.project_id)
        if properties is None:
            logger.warning(
                "Cannot read the metadata properties of project %s, so %s is not declared as a number; "
                "declare it in the project settings to filter by range", self.project_id, key,
            )
            return
        if (properties.get(key) or {}).get("type") == "number":
            return
        declared = {
            **properties,
            key: {"type": "number", "filterable": True, "visibleByLabeler": False, "visibleByReviewer": True},
        }
        try:
            self.gateway.set_metadata_properties(self.project_id, declared)
        except KiliApiError as error:
            logger.warning("Cannot declare %s as a number in project %s: %s", key, self.project_id, error)
            return
        logger.info("Declared metadata key %s as a number in project %s", key, self.project_id)

    def _print_plan(self, plan: WritePlan) -> None:
        flagged_key = self.key_prefix + FLAGGED
        flagged = [asset_id for asset_id, metadata in plan.metadata.items() if metadata.get(flagged_key) is True]
        print(
            f"Dry run on Kili project {self.project_id}: would update the metadata of {len(plan.metadata)} assets "
            f"({len(flagged)} flagged, {plan.unchanged} unchanged), set the priority of {len(plan.priorities)}"
            + (f", send {len(plan.newly_flagged)} to review" if self.send_to_review else "")
            + (f", open {len(plan.newly_flagged)} issues" if self.create_issues else "")
            + "; nothing was written."
        )
        for asset_id in flagged[:DRY_RUN_LISTED]:
            metadata = plan.metadata[asset_id]
            print(
                f"  {asset_id}: score {metadata.get(self.key_prefix + SCORE)}, suggested "
                f"{metadata.get(self.key_prefix + SUGGESTED_LABEL)}, priority {plan.priorities.get(asset_id)}"
            )
        if len(flagged) > DRY_RUN_LISTED:
            print(f"  ... and {len(flagged) - DRY_RUN_LISTED} more flagged assets")

    def clear_results(self, *, dry_run: bool = False) -> int:
        """Remove the tool's own keys from every asset; return how many assets had them."""
        state = self._current_state()
        cleared = {}
        for asset_id, entry in state.items():
            remaining = clear_metadata(entry["metadata"], prefix=self.key_prefix)
            if remaining != entry["metadata"]:
                cleared[asset_id] = remaining
        if dry_run or not cleared:
            return len(cleared)
        summary = WriteSummary()
        self._write_metadata(cleared, summary)
        if summary.failed:
            raise KiliApiError(f"clearing failed for {summary.failed} assets: {summary.errors[0]}")
        return len(cleared)

    def asset_url(self, asset_id: str) -> str | None:
        # NOTE: the labeling-page path is Kili's web app route as commonly linked, not an API
        # guarantee; the host is the API endpoint's host.
        endpoint = urlparse(self.gateway.endpoint)
        return f"{endpoint.scheme}://{endpoint.netloc}/label/projects/{self.project_id}/label/{asset_id}"
