"""torchtitan 0.3.0 as the candidate of the built-in deepseek_v3 and qwen3_moe archs (same tiny
configs, reference and capabilities; torchtitan's model, converters and probes).

    bash scripts/setup_torchtitan.sh
    TRITON_INTERPRET=1 .venv-torchtitan/bin/pytest --arch-plugin examples/torchtitan/plugin.py \\
        --arch torchtitan_deepseek_v3,torchtitan_qwen3_moe
"""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))

import build  # noqa: E402
import probes  # noqa: E402
from moe_conformance.registry import discover  # noqa: E402

CONVERTER = SimpleNamespace(to_candidate=build.to_candidate, to_hf=build.to_hf)
ARCHS = tuple(
    discover()[0][name].load().replace(name=f"torchtitan_{name}", candidate=build.build, converter=CONVERTER,
                                       probes=probes.probes(name), cast=build.cast)
    for name in ("deepseek_v3", "qwen3_moe")
)
