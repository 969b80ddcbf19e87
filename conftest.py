"""Root conftest. The conformance suites need nothing from here (the installed plugin provides
everything, also when the suites run from an installed wheel); this only keeps the project's
own test runs offline like the suites. pytester is enabled in pyproject's addopts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
