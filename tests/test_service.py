"""The composition root: settings it refuses to build a gateway from."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, Settings
from tests.conftest import POLICIES


def test_auth_on_without_a_keys_file_is_a_config_error(clean_env: pytest.MonkeyPatch) -> None:
    from gateway.service import Gateway

    with pytest.raises(ConfigError, match="no API keys file"):
        Gateway.from_settings(Settings(auth="on", policies=POLICIES))
