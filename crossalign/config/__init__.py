"""Shared by every stage: one typed, validated configuration tree, loaded from ``params.yaml``.

Each top-level section belongs to one stage of the DAG (``dvc.yaml`` declares exactly the keys
each stage reads). A wrong key or value fails at load with the dotted key, the value given and
what is allowed: :class:`ConfigError`. ``params`` holds the sections, ``load`` reads and explains,
``uris`` keeps credentials out of both.
"""
from crossalign.config.load import (ConfigError, allowed_keys, from_dict, load, missing_keys, suggest,  # noqa: F401
                                    unknown_key_hint)
from crossalign.config.params import *  # noqa: F401,F403
from crossalign.config.params import CONTROL_PARTS, METHOD_NAMES, Config  # noqa: F401
from crossalign.config.uris import _shown, redact_uri, uri_has_password, uri_userinfo  # noqa: F401
