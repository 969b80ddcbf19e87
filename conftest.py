"""Root conftest for the project's own tests (tests/): pytester drives the plugin end to end.
The conformance suites themselves need nothing from here: the installed plugin provides all."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["pytester"]
