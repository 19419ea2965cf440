"""Registering the scorer with Kili: a webhook to the self-hosted service, or a Kili-hosted plugin.

A webhook is created, or updated when a plugin of that name exists, with the
handler types ``onSubmit`` and ``onReview`` and the secret as the
``Authorization`` header, then activated on the project.

A hosted plugin is uploaded from a bundle folder. Kili uploads only the
``.py`` files of a plugin folder plus ``requirements.txt`` (kili 26.2.4,
``kili/services/plugins/upload.py``). The bundle therefore carries the code
of ``plugin/`` and of the Kili writer, the configuration as a Python module,
and the current model version's files base64-encoded in Python modules.
Hosted plugins get 512 MB of memory and 60 s per run (Kili's plugin
documentation).
"""

from __future__ import annotations

import base64
import json
import logging
import pprint
import shutil
from pathlib import Path

from training.sources.kili_gateway import KiliApiError, KiliGateway

from .config import PluginConfig, config_to_dict
from .model_version import ModelVersion, ModelVersionError, current_version_dir

logger = logging.getLogger(__name__)

HANDLER_TYPES = ["onSubmit", "onReview"]
REPO_ROOT = Path(__file__).resolve().parent.parent
# Files of the Kili writer that the plugin code imports, relative to the repository root.
WRITER_FILES = ("training/__init__.py", "training/sources/__init__.py", "training/sources/base.py",
                "training/sources/kili.py", "training/sources/kili_gateway.py")
HOSTED_REQUIREMENTS = ("numpy", "pillow", "onnxruntime", "tenacity", "requests")
# Upper bound for one embedded model file: the bundle must load within the hosted plugin's 512 MB.
MAX_EMBEDDED_BYTES = 100 * 1024 * 1024


def _plugin_names(gateway: KiliGateway) -> set[str]:
    plugins = gateway._call("the list of plugins", gateway.kili.list_plugins, fields=["name"])
    return {plugin.get("name") for plugin in plugins or []}


def _activate(gateway: KiliGateway, plugin_name: str, project_id: str) -> str:
    """Activate a plugin or webhook on the project; return "activated" or "already active"."""
    try:
        gateway._call(f"the activation of {plugin_name!r} on project {project_id}",
                      gateway.kili.activate_plugin_on_project, plugin_name=plugin_name, project_id=project_id)
    except KiliApiError as error:
        # Kili reports an existing activation as an "already exists" GraphQL error (kili 26.2.4 raises it).
        if "already exists" in str(error):
            return "already active"
        raise
    return "activated"


def deploy_webhook(gateway: KiliGateway, config: PluginConfig, url: str, plugin_name: str, secret: str) -> str:
    """Create or update the webhook for ``url`` and activate it on the project; return what was done."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must be an http(s) URL that Kili can reach, got {url!r}")
    if plugin_name in _plugin_names(gateway):
        gateway._call(f"the update of webhook {plugin_name!r}", gateway.kili.update_webhook,
                      new_webhook_url=url, plugin_name=plugin_name, new_header=secret,
                      handler_types=HANDLER_TYPES, verbose=False)
        action = "updated"
    else:
        gateway._call(f"the creation of webhook {plugin_name!r}", gateway.kili.create_webhook,
                      webhook_url=url, plugin_name=plugin_name, header=secret,
                      handler_types=HANDLER_TYPES, verbose=False)
        action = "created"
    state = _activate(gateway, plugin_name, config.project_id)
    logger.info("Webhook %s %s for %s (handlers %s), %s on project %s",
                plugin_name, action, url, ", ".join(HANDLER_TYPES), state, config.project_id)
    return f"webhook {plugin_name} {action} for {url} (handlers {', '.join(HANDLER_TYPES)}), {state} on project {config.project_id}"


def build_hosted_bundle(config: PluginConfig, target: str | Path) -> Path:
    """Write the folder that ``upload_plugin`` zips: main.py, the code, the config and the model version."""
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    (target / "plugin").mkdir(parents=True)
    shutil.copyfile(REPO_ROOT / "plugin" / "main.py", target / "main.py")
    for source in sorted((REPO_ROOT / "plugin").glob("*.py")):
        if source.name not in ("bundled_config.py", "bundled_model.py"):
            shutil.copyfile(source, target / "plugin" / source.name)
    for relative in WRITER_FILES:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / relative, target / relative)

    version_dir = current_version_dir(config.models_dir)
    if version_dir is None:
        raise ModelVersionError(
            f"no model version in {config.models_dir}: train one with `kili-label-errors train` before "
            "uploading a hosted plugin, which carries the model version with it"
        )
    version = ModelVersion.load(version_dir, providers=["CPUExecutionProvider"])
    files = {}
    for name in [*version.manifest["files"], "manifest.json"]:
        data = (version_dir / name).read_bytes()
        if len(data) > MAX_EMBEDDED_BYTES:
            raise ModelVersionError(
                f"model file {name} of version {version.name} has {len(data)} bytes, over the "
                f"{MAX_EMBEDDED_BYTES} bytes a hosted plugin can carry; use the self-hosted service"
            )
        files[name] = base64.b64encode(data).decode("ascii")
    (target / "plugin" / "bundled_model.py").write_text(
        '"""The model version embedded in a hosted plugin (generated by `kili-label-errors deploy --hosted`)."""\n\n'
        f"VERSION = {version.name!r}\nFILES = {json.dumps(files, indent=0)}\n",
        encoding="utf-8",
    )
    (target / "plugin" / "bundled_config.py").write_text(
        '"""The plugin configuration embedded in a hosted plugin (generated by `kili-label-errors deploy --hosted`)."""\n\n'
        f"CONFIG = {pprint.pformat(config_to_dict(config))}\n",
        encoding="utf-8",
    )
    (target / "requirements.txt").write_text("\n".join(HOSTED_REQUIREMENTS) + "\n", encoding="utf-8")
    logger.info("Hosted plugin bundle written to %s with model version %s", target, version.name)
    return target


def deploy_hosted(gateway: KiliGateway, config: PluginConfig, plugin_name: str, bundle_dir: str | Path) -> str:
    """Upload (or update) the hosted plugin from a fresh bundle and activate it on the project."""
    bundle = build_hosted_bundle(config, bundle_dir)
    if plugin_name in _plugin_names(gateway):
        gateway._call(f"the update of plugin {plugin_name!r}", gateway.kili.update_plugin,
                      plugin_path=str(bundle), plugin_name=plugin_name, verbose=False)
        action = "updated"
    else:
        gateway._call(f"the upload of plugin {plugin_name!r}", gateway.kili.upload_plugin,
                      plugin_path=str(bundle), plugin_name=plugin_name, verbose=False)
        action = "uploaded"
    state = _activate(gateway, plugin_name, config.project_id)
    logger.info("Hosted plugin %s %s from %s, %s on project %s", plugin_name, action, bundle, state, config.project_id)
    return f"hosted plugin {plugin_name} {action} from {bundle}, {state} on project {config.project_id}"
