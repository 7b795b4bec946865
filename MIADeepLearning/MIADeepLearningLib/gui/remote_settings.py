"""The inference server a module sends its jobs to when Device is "remote": address, token and certificate.

Why here: they are kept in Slicer's application settings (this computer, this user), never in the parameter node,
the scene or a saved .mrb, so a scene shared with a colleague carries no token. Every module shows the same fields
(Advanced → Remote server) and reads the same settings.
"""

from __future__ import annotations

from typing import Any

import qt
from slicer.i18n import tr as _

SETTINGS_URL = "MIADeepLearning/RemoteServer/URL"
SETTINGS_TOKEN = "MIADeepLearning/RemoteServer/Token"
SETTINGS_CA_FILE = "MIADeepLearning/RemoteServer/CAFile"
# (widget of the .ui, settings key)
FIELDS = (
    ("remoteUrlLineEdit", "MIADeepLearning/RemoteServer/URL"),
    ("remoteTokenLineEdit", "MIADeepLearning/RemoteServer/Token"),
    ("remoteCaFileLineEdit", "MIADeepLearning/RemoteServer/CAFile"),
)


def _setting(key: str) -> str:
    value = qt.QSettings().value(key)
    return str(value) if value else ""


def loadInto(ui: Any) -> None:
    """Fill a module's Remote server fields from the settings."""
    for widgetName, key in FIELDS:
        if hasattr(ui, widgetName):
            getattr(ui, widgetName).text = _setting(key)


def saveFrom(ui: Any) -> None:
    """Store what the fields hold (called when a field is edited), so every module sees it."""
    settings = qt.QSettings()
    for widgetName, key in FIELDS:
        if hasattr(ui, widgetName):
            settings.setValue(key, str(getattr(ui, widgetName).text).strip())


def missingSetting() -> str | None:
    """Why a remote run cannot start (the Apply tooltip), None when address and token are set."""
    if not _setting(SETTINGS_URL) or not _setting(SETTINGS_TOKEN):
        return _("Device 'remote': enter the server's address and token under Advanced → Remote server.")
    return None


def server() -> Any:
    """The configured server (MIADeepLearningLib.remote.RemoteServer); RemoteError (one sentence) when the
    settings do not make one."""
    from MIADeepLearningLib import remote

    return remote.RemoteServer(_setting(SETTINGS_URL), _setting(SETTINGS_TOKEN),
                               ca_file=_setting(SETTINGS_CA_FILE) or None)


def testConnection() -> str:
    """One line: the server's version and device, or why it cannot be used (RemoteError raised)."""
    configured = server()
    return configured.describe(configured.health())
