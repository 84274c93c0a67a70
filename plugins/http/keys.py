"""API keys for the HTTP plugins come from the environment only, never from a config file."""

from __future__ import annotations

import os


class MissingAPIKeyError(ValueError):
    """The environment variable that should hold an API key is unset or empty."""


def key_from_env(env_name: str | None, endpoint: str, plugin: str) -> str | None:
    """The key held in ``$env_name``; None when ``env_name`` is None (a server that needs no key).

    Raises:
        MissingAPIKeyError: the variable is unset or empty; the message names it, the endpoint and
            how to point the plugin at another variable.
    """
    if env_name is None:
        return None
    if not isinstance(env_name, str) or not env_name:
        raise MissingAPIKeyError(f"{plugin}: api_key_env must name an environment variable (or be null), "
                                 f"got {env_name!r}")
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise MissingAPIKeyError(
            f"{plugin}: the environment variable {env_name} holds no API key for {endpoint}; export "
            f"{env_name}=<key>, or set the plugin's api_key_env to the variable that holds it "
            f"(api_key_env: null for a local server that needs no key)"
        )
    return key
