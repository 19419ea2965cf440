"""The interface every labeled-image source implements.

A source is a project: an ordered list of classes, assets that each carry
their current label, the image bytes of each asset, and a place to store the
per-asset results (metadata and review priority). ``LocalProject`` reads a
folder or a CSV manifest; ``KiliProject`` reads a Kili project through the SDK.
Sources import no torch, so the plugin can use them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field


class SourceError(ValueError):
    """A project could not be read: the message names the value and the fix."""


@dataclass(frozen=True)
class Asset:
    """One labeled image. ``label`` is a class name from ``ProjectSource.classes``."""

    asset_id: str
    label: str
    location: str = ""  # a file path or URL, shown in reports
    external_id: str = ""


@dataclass(frozen=True)
class AssetResult:
    """Output for one asset: the tool's own metadata keys and a review priority."""

    asset_id: str
    metadata: Mapping[str, object]
    priority: int


@dataclass
class WriteSummary:
    """Counts of one write: changed assets, unchanged ones and failures."""

    written: int = 0
    unchanged: int = 0
    failed: int = 0
    dry_run: bool = False
    errors: list[str] = field(default_factory=list)


@dataclass
class ReadSummary:
    """Counts of what ``list_assets`` skipped, by reason."""

    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


class ProjectSource(ABC):
    """A labeled image-classification project."""

    #: Shown in logs and reports: a folder path or a Kili project id.
    name: str = ""

    def __init__(self) -> None:
        self.read_summary = ReadSummary()

    @abstractmethod
    def classes(self) -> list[str]:
        """Return the class names in a fixed order (the model's output order)."""

    def class_display_names(self) -> dict[str, str]:
        """Return a readable name per class for reports (the name itself by default)."""
        return {name: name for name in self.classes()}

    @abstractmethod
    def list_assets(self) -> Iterator[Asset]:
        """Yield every asset that has a usable label; count the rest in ``read_summary``."""

    @abstractmethod
    def read_image(self, asset: Asset) -> bytes:
        """Return the raw bytes of the asset's image; raise ``OSError`` on failure."""

    @abstractmethod
    def read_results(self, asset_ids: Sequence[str] | None = None) -> dict[str, dict]:
        """Return the stored tool metadata per asset id (all assets when None)."""

    @abstractmethod
    def write_results(self, results: Sequence[AssetResult], *, dry_run: bool = False) -> WriteSummary:
        """Store each asset's metadata and priority; write nothing when ``dry_run``."""

    def asset_url(self, asset_id: str) -> str | None:
        """Return a link to the asset in its labeling tool, where there is one."""
        return None
