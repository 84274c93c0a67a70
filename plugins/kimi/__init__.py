"""Plugins that run on the user's own Kimi-Audio installation (its kimia_infer package)."""
