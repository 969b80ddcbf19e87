"""The HTML report: self-contained, readable, and its plots really render in a browser
(headless Chromium; skipped where it is not installed: ``apt-get install -y chromium``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_conformance import html_report, plots

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NEEDS_CHROMIUM = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                    "(Debian: apt-get install -y chromium)")
SFT = "test_sft_curves[kimi_k25-faithful]"
DIAGNOSIS = ("kimi_k25-faithful: loss_ratio = 0.93 (gate: <= 0.75)\n"
             "first divergence: reference model.layers.1.mlp.gate <-> candidate layers.1.moe.router: "
             "selected experts differ on 17/40 tokens <b>not markup</b>")


def _report(arch: str = "kimi_k25") -> dict:
    curves = {"title": "SFT loss", "log_panels": ["grad_norm"],
              "panels": {"loss": {"reference": [3.0, 2.4, 2.0, 1.7, 1.5], "candidate": [3.0, 2.8, 2.7, 2.6, 2.6]},
                         "grad_norm": {"candidate": [1.0, 0.4, 0.2, 0.05, 0.0]}}}
    checks = [
        {"name": f"test_logit_parity[{arch}-faithful-plain]", "family": "logit_parity", "variant": "faithful",
         "status": "passed", "message": "", "seconds": 1.25,
         "figures": {"max_abs_logit_delta": 2.1e-5, "kl_mean": 4.2e-12, "top1_agreement": 1.0, "tokens": 80},
         "thresholds": {"max_abs_logit_delta": 5e-4, "kl_mean": 1e-9, "top1_agreement": 1.0}},
        {"name": f"test_sft_curves[{arch}-faithful]", "family": "sft", "variant": "faithful", "status": "failed",
         "message": DIAGNOSIS, "seconds": 12.0,
         "figures": {"loss_ratio": 0.93, "curves": curves}, "thresholds": {"loss_ratio": 0.75}},
        {"name": f"test_release[{arch}-faithful]", "family": "dry_run", "variant": "faithful", "status": "skipped",
         "message": "no released config declared", "seconds": 0.0, "figures": {}, "thresholds": {}},
    ]
    return {"schema_version": 2, "arch": arch, "generated_at": "2026-12-01T00:00:00+00:00",
            "reference": "transformers.DeepseekV3ForCausalLM", "candidate": "my_team.Model",
            "environment": {"device": "cpu", "seed": 0, "versions": {"torch": "2.13.0", "transformers": "5.24.0"},
                            "warnings": ["transformers 9.9 is outside the tested range"]},
            "checks": checks}


@pytest.fixture
def page(tmp_path) -> tuple[str, dict]:
    report = _report()
    images = plots.render(tmp_path, report)  # the project's own plotting, as the report writer uses it
    assert set(images) == {SFT}
    return html_report.render([report, _report("glm4_moe")], images), images


def test_page_is_self_contained(page):
    text, _ = page
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text), "every src/href is inline data or an anchor"
    assert "<link" not in text and "<script" not in text and "url(" not in text
    assert text.count('src="data:image/png;base64,') == 1


def test_page_has_summary_rows_figures_thresholds_and_diagnosis(page):
    text, _ = page
    assert '<a href="#kimi_k25">kimi_k25</a></td><td><a href="#kimi_k25-sft">sft</a>' in text
    assert "max_abs_logit_delta = 2.1e-05" in text and "max_abs_logit_delta: 0.0005" in text
    assert "kl_mean: 1e-09" in text
    # the full diagnosis, open under the failing check, escaped
    assert "selected experts differ on 17/40 tokens &lt;b&gt;not markup&lt;/b&gt;" in text
    assert "<details open><summary>diagnosis</summary>" in text
    assert "transformers 9.9 is outside the tested range" in text
    # failures first within a family, and both archs present
    assert text.index("kimi_k25-sft") < text.index('id="glm4_moe"')


def test_images_as_bytes_or_paths(page, tmp_path):
    _, images = page
    (path,) = images.values()
    as_bytes = html_report.render([_report()], {SFT: path.read_bytes()})
    as_path = html_report.render([_report()], {SFT: str(path)})
    assert as_bytes == as_path


def test_write_draws_plots_itself(tmp_path):
    path = html_report.write(tmp_path, [_report()])
    assert path == tmp_path / "index.html"
    assert 'src="data:image/png;base64,' in path.read_text()


# ------------------------------------------------------------------------------------------
# in a real browser

PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  const marker = document.createElement('div');
  marker.id = 'image-probe';
  marker.textContent = `decoded ${decoded} of ${images.length}`;
  document.body.appendChild(marker);
});
</script>"""


def _chromium(tmp_path: Path, html_path: Path, *mode: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{mode[0].strip('-').split('=')[0]}"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1200,2000", *mode, html_path.as_uri()],
        capture_output=True, text=True, timeout=120, check=True)


def _probe(tmp_path: Path, text: str, name: str) -> str:
    """The page with the probe script, loaded in Chromium: the probe's line from the DOM."""
    path = tmp_path / name
    path.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp_path, path, "--virtual-time-budget=10000", "--dump-dom").stdout
    m = re.search(r'<div id="image-probe">([^<]*)</div>', dom)
    assert m, f"the probe did not run: {dom[-500:]}"
    return m.group(1)


def _plot_pixels(png: Path) -> tuple[int, int]:
    """(distinct colours, pixels of matplotlib's second colour, the candidate's dashed orange)."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 24) or []
    orange = sum(n for n, (r, g, b) in colours if abs(r - 0xFF) < 40 and abs(g - 0x7F) < 40 and b < 60)
    return len(colours), orange


@NEEDS_CHROMIUM
def test_chromium_renders_the_plot(page, tmp_path):
    text, _ = page
    assert _probe(tmp_path, text, "report.html") == "decoded 1 of 1"
    html_path = tmp_path / "shot.html"
    html_path.write_text(text)
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, html_path, f"--screenshot={shot}")
    colours, orange = _plot_pixels(shot)
    assert colours > 50, "the screenshot is blank"
    assert orange > 100, f"no candidate curve in the screenshot ({orange} orange pixels)"


@NEEDS_CHROMIUM
def test_chromium_probe_sees_a_broken_image(tmp_path):
    """The control: an image that does not decode reads 0 of 1, and no curve is drawn."""
    text = html_report.render([_report()], {SFT: b"not a png"})
    assert _probe(tmp_path, text, "broken.html") == "decoded 0 of 1"
    html_path = tmp_path / "broken-shot.html"
    html_path.write_text(text)
    shot = tmp_path / "broken.png"
    _chromium(tmp_path, html_path, f"--screenshot={shot}")
    assert _plot_pixels(shot)[1] < 20
