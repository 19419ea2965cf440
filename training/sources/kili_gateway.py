"""The network edge of the Kili source: SDK calls and image downloads.

``KiliGateway`` is the only module that imports ``kili`` (pinned to 26.2.4 in
pyproject.toml: the return shapes of ``add_to_review`` and
``set_assets_priority`` changed within 26.x). It turns SDK exceptions into
``SourceError`` messages that name the value and the fix, and never logs or
prints the API key. ``ImageDownloader`` fetches asset images with requests.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from urllib.parse import urlparse

import requests
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from .base import SourceError

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://cloud.kili-technology.com/api/label/v2/graphql"
# Kili's own page size for mutations (kili.core.constants.MUTATION_BATCH_SIZE).
WRITE_BATCH_SIZE = 100
API_KEY_HELP = (
    "pass --api-key KEY, set the KILI_API_KEY environment variable or put api_key in kili-sdk-config.json; "
    "create a key in Kili under My account > API Key"
)


class KiliApiError(SourceError):
    """A failed Kili API call; the message names the call and Kili's error."""


def _describe(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class KiliGateway:
    """The SDK calls that ``KiliProject`` makes, one method each."""

    def __init__(self, api_key: str | None = None, api_endpoint: str | None = None, *, client=None) -> None:
        if client is not None:
            self.kili = client
        else:
            self.kili = self._connect(api_key, api_endpoint)
        self.endpoint: str = self.kili.api_endpoint
        self.api_key: str = self.kili.api_key

    @staticmethod
    def _connect(api_key: str | None, api_endpoint: str | None):
        from kili.client import Kili
        from kili.core.config_loader import load_config_from_file
        from kili.exceptions import AuthenticationFailed

        # Without a key the SDK prompts for one on a terminal; a scheduled run must fail instead.
        if not (api_key or os.getenv("KILI_API_KEY") or load_config_from_file().get("api_key")):
            raise SourceError(f"missing Kili API key: {API_KEY_HELP}")
        endpoint = api_endpoint or os.getenv("KILI_API_ENDPOINT") or None
        try:
            kili = Kili(api_key=api_key, api_endpoint=endpoint, disable_tqdm=True)
        except AuthenticationFailed as error:
            if "provide an API KEY" in str(error):
                raise SourceError(f"missing Kili API key: {API_KEY_HELP}") from None
            raise SourceError(
                f"the Kili API key was rejected by {endpoint or DEFAULT_ENDPOINT}: check that it is valid "
                f"and not expired, and that --api-endpoint names your Kili server; {API_KEY_HELP}"
            ) from None
        # The SDK skips its own key check when KILI_SDK_SKIP_CHECKS is set. This request
        # is not retried, so an invalid key fails at once. The SDK's GraphQL client would
        # retry HTTP 401 for two minutes.
        try:
            response = kili.http_client.post(
                url=kili.api_endpoint,
                data='{"query":"{ viewer { id email } }"}',
                timeout=30,
                headers={
                    "Authorization": f"X-API-Key: {kili.api_key}",
                    "Accept": "application/json",
                    "Content-Type": "application/json",
                },
            )
        except requests.RequestException as error:
            raise SourceError(
                f"cannot reach the Kili endpoint {kili.api_endpoint} ({_describe(error)}): "
                "check the network and --api-endpoint"
            ) from None
        if response.status_code == 401 or (response.ok and "email" not in response.text):
            raise SourceError(
                f"the Kili API key was rejected by {kili.api_endpoint} (HTTP {response.status_code}): "
                f"check that it is valid and not expired; {API_KEY_HELP}"
            )
        if not response.ok:
            raise SourceError(
                f"the Kili endpoint {kili.api_endpoint} returned HTTP {response.status_code} to the key check: "
                "check --api-endpoint (it ends with /api/label/v2/graphql)"
            )
        return kili

    def _call(self, what: str, function, *args, **kwargs):
        from kili.exceptions import GraphQLError, MutationOutcomeUnknownError, NotFound

        try:
            return function(*args, **kwargs)
        except MutationOutcomeUnknownError as error:
            raise KiliApiError(
                f"Kili did not confirm {what} ({_describe(error)}); it may or may not have been applied: "
                "rerun the command, which rewrites only what differs"
            ) from error
        except (GraphQLError, NotFound) as error:
            raise KiliApiError(f"Kili rejected {what}: {_describe(error)}") from error
        except requests.RequestException as error:
            raise KiliApiError(
                f"{what} failed with a network error ({_describe(error)}): check the connection to {self.endpoint}"
            ) from error

    # Reading -----------------------------------------------------------------

    def project(self, project_id: str) -> dict | None:
        """Return the project's id, title, input type, interface and workflow version, or None."""
        projects = self._call(
            f"the read of project {project_id!r}",
            self.kili.projects,
            project_id=project_id,
            fields=["id", "title", "inputType", "jsonInterface", "workflowVersion"],
            disable_tqdm=True,
        )
        return projects[0] if projects else None

    def metadata_properties(self, project_id: str) -> dict | None:
        """Return the project's declared metadata properties, or None where Kili does not expose them."""
        from kili.exceptions import GraphQLError

        # NOTE: the SDK (26.2.4) writes metadataProperties but never reads it. That the
        # Project type exposes a field of that name is an assumption, so errors return None.
        try:
            projects = self.kili.projects(project_id=project_id, fields=["metadataProperties"], disable_tqdm=True)
        except GraphQLError as error:
            logger.debug("Cannot read the metadata properties of project %s: %s", project_id, _describe(error))
            return None
        properties = projects[0].get("metadataProperties") if projects else None
        if properties is None:
            return {}
        if isinstance(properties, str):  # a JSON scalar may arrive serialized
            try:
                properties = json.loads(properties)
            except ValueError:
                return None
        return properties if isinstance(properties, dict) else None

    def set_metadata_properties(self, project_id: str, properties: dict) -> None:
        self._call(
            "the update of the project's metadata properties",
            self.kili.update_properties_in_project,
            project_id=project_id,
            metadata_properties=properties,
        )

    def iter_assets(self, project_id: str, fields: Sequence[str], asset_ids: Sequence[str] | None = None) -> Iterator[dict]:
        """Yield the project's assets with only ``fields``, paged by the SDK."""
        kwargs = {"asset_id_in": list(asset_ids)} if asset_ids is not None else {}
        assets = self._call(
            f"the asset query of project {project_id!r}",
            self.kili.assets,
            project_id=project_id,
            fields=list(fields),
            as_generator=True,
            disable_tqdm=True,
            **kwargs,
        )
        iterator = iter(assets)
        while True:
            # The generator sends its queries lazily, so errors surface here.
            asset = self._call(f"the asset query of project {project_id!r}", next, iterator, None)
            if asset is None:
                return
            yield asset

    # Writing -----------------------------------------------------------------

    def update_metadata(self, asset_ids: Sequence[str], metadatas: Sequence[dict]) -> None:
        """Replace the ``jsonMetadata`` of each asset, pairing ids and values by position."""
        self._call(
            f"the metadata update of {len(asset_ids)} assets",
            self.kili.update_properties_in_assets,
            asset_ids=list(asset_ids),
            json_metadatas=list(metadatas),
        )

    def set_priority(self, project_id: str, priority: int, asset_ids: Sequence[str]) -> dict:
        """Set one priority on several assets; return Kili's succeeded/declined/failed outcome."""
        return self._call(
            f"setting priority {priority} on {len(asset_ids)} assets",
            self.kili.set_assets_priority,
            priority=priority,
            asset_ids=list(asset_ids),
            project_id=project_id,
        )

    def add_to_review(self, project_id: str, asset_ids: Sequence[str]) -> dict:
        """Send assets to review; return Kili's succeeded/declined/failed outcome."""
        return self._call(
            f"sending {len(asset_ids)} assets to review",
            self.kili.add_to_review,
            asset_ids=list(asset_ids),
            project_id=project_id,
        )

    def create_issues(self, project_id: str, label_ids: Sequence[str], texts: Sequence[str]) -> list[str]:
        """Open one issue per label with its text; return the new issue ids."""
        created = self._call(
            f"the creation of {len(label_ids)} issues",
            self.kili.create_issues,
            project_id=project_id,
            label_id_array=list(label_ids),
            text_array=list(texts),
        )
        return [item["id"] for item in created]


def is_transient(error: BaseException) -> bool:
    """Tell whether a download error may pass on a retry: timeouts, resets, 429 and 5xx."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return error.response.status_code == 429 or error.response.status_code >= 500
    return isinstance(error, (requests.ConnectionError, requests.Timeout))


class ImageTooLargeError(OSError):
    """An error for an image over the download size limit."""


class ImageDownloader:
    """Download asset images, sending the API key only to the Kili server's own URLs."""

    def __init__(
        self,
        endpoint: str,
        api_key: str,
        *,
        max_bytes: int = 50 * 1024 * 1024,
        timeout: tuple[float, float] = (10.0, 60.0),
        attempts: int = 4,
        verify: bool | str = True,
    ) -> None:
        endpoint_url = urlparse(endpoint)
        self._trusted = (endpoint_url.scheme, endpoint_url.netloc)
        self._api_key = api_key
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.verify = verify
        self._local = threading.local()  # one requests.Session per download thread
        self._get = retry(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.5, max=8),
            reraise=True,
            before_sleep=self._log_retry,
        )(self._get_once)

    @staticmethod
    def _log_retry(state) -> None:
        logger.info(
            "Retrying an image download (attempt %d failed: %s)",
            state.attempt_number, _describe(state.outcome.exception()),
        )

    def is_trusted(self, url: str) -> bool:
        """Tell whether ``url`` is on the Kili server itself (same scheme and host), so it may get the key."""
        parsed = urlparse(url)
        return (parsed.scheme, parsed.netloc) == self._trusted

    def _get_once(self, url: str) -> bytes:
        headers = {"Authorization": f"X-API-Key: {self._api_key}"} if self.is_trusted(url) else {}
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        with session.get(url, headers=headers, timeout=self.timeout, stream=True, verify=self.verify) as response:
            response.raise_for_status()
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > self.max_bytes:
                raise ImageTooLargeError(f"image of {declared} bytes is over the limit of {self.max_bytes} bytes")
            chunks, size = [], 0
            for chunk in response.iter_content(chunk_size=1 << 16):
                size += len(chunk)
                if size > self.max_bytes:
                    raise ImageTooLargeError(f"image is over the limit of {self.max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

    def download(self, url: str) -> bytes:
        """Return the bytes at ``url``; raise ``OSError`` naming the URL's host on failure."""
        try:
            return self._get(url)
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else "?"
            hint = ""
            if status in (401, 403) and self.is_trusted(url):
                hint = " (the API key was not accepted for this file)"
            elif status in (401, 403):
                hint = " (the API key is sent only to the Kili server's own URLs, so this URL must be readable without it)"
            raise OSError(f"download from {urlparse(url).netloc} failed with HTTP {status}{hint}") from None
        except requests.RequestException as error:
            raise OSError(f"download from {urlparse(url).netloc} failed: {_describe(error)}") from None
