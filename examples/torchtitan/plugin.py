"""torchtitan 0.3.0 as the candidate of the built-in deepseek_v3 and qwen3_moe archs (same tiny
configs, reference and capabilities; torchtitan's model, converters and probes).

    bash scripts/setup_torchtitan.sh
    TRITON_INTERPRET=1 .venv-torchtitan/bin/pytest --arch-plugin examples/torchtitan/plugin.py \\
        --arch torchtitan_deepseek_v3,torchtitan_qwen3_moe

TORCHTITAN_FIXES=masks,sdpa_attention (a comma list of build.FIXES; default: all) runs the suites on
torchtitan with only those corrections, to see what the suites say about the others.
"""

import functools
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))

import build  # noqa: E402
import probes  # noqa: E402
from moe_conformance.registry import discover  # noqa: E402

FIXES = tuple(f for f in os.environ.get("TORCHTITAN_FIXES", ",".join(build.FIXES)).split(",") if f)
CONVERTER = SimpleNamespace(to_candidate=build.to_candidate, to_hf=build.to_hf)
ARCHS = tuple(
    discover()[0][name].load().replace(name=f"torchtitan_{name}", candidate=functools.partial(build.build, fixes=FIXES), converter=CONVERTER,
                                       probes=probes.probes(name), cast=build.cast,
                                       decoding=None)  # torchtitan 0.3.0's decoder has no KV cache
    for name in ("deepseek_v3", "qwen3_moe")
)
