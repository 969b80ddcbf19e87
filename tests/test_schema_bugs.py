"""The schema suite fails when the candidate's state-dict format changes: snapshots recorded for
an arch, then a candidate that renames a parameter, shows the diff naming the key."""

from __future__ import annotations

import textwrap

from helpers import checks_by_name, run_suites

PLUGIN = textwrap.dedent("""
    import dataclasses
    import torch
    from moe_conformance.registry import discover
    spec = discover()[0]["qwen3_moe"].load()
    RENAMED = {renamed}

    def candidate(config):
        model = spec.candidate(config)
        if RENAMED:  # a PR renames the final norm (and its converter rule): the candidate format changes
            model.final_norm = model.norm
            del model.norm
            model.__class__ = type("Renamed", (type(model),), {{"norm": property(lambda self: self.final_norm)}})
        return model

    class Converter:
        def __getattr__(self, name):
            return getattr(spec.converter, name)

        def to_candidate(self, sd):
            out = spec.converter.to_candidate(sd)
            if RENAMED:
                out["final_norm.weight"] = out.pop("norm.weight")
            return out

        def to_hf(self, sd):
            sd = dict(sd)
            if RENAMED:
                sd["norm.weight"] = sd.pop("final_norm.weight")
            return spec.converter.to_hf(sd)

    ARCH = dataclasses.replace(spec, name="team_qwen3", candidate=candidate, converter=Converter(),
                               variants=(spec.variant("faithful"),))
""")


def test_renamed_candidate_parameter_shows_as_a_schema_diff(pytester):
    _, reports = run_suites(pytester, "--snapshot-update", suite="test_schema.py",
                            plugin_source=PLUGIN.format(renamed=False), plugin_name="team_qwen3_v1")
    assert {c["status"] for c in reports["team_qwen3"]["checks"]} == {"passed"}
    assert (pytester.path / "__snapshots__" / "team_qwen3" / "test_schema.ambr").exists()

    _, reports = run_suites(pytester, suite="test_schema.py",
                            plugin_source=PLUGIN.format(renamed=True), plugin_name="team_qwen3_v2")
    checks = checks_by_name(reports["team_qwen3"])
    assert checks["test_checkpoint_schema[team_qwen3-faithful]"]["status"] == "passed"
    candidate = checks["test_candidate_schema[team_qwen3-faithful]"]
    assert candidate["status"] == "failed", candidate
    assert "final_norm.weight" in candidate["message"] and "snapshot" in candidate["message"].lower(), candidate["message"]


LAYERED = textwrap.dedent("""
    import dataclasses
    from moe_conformance.registry import discover
    spec = discover()[0]["qwen3_moe"].load()
    faithful = spec.variant("faithful")
    EXTRA = {extra}

    def config():
        cfg = faithful.config()
        cfg.num_hidden_layers += EXTRA  # a PR changes the tiny config: the checkpoint format changes
        return cfg

    ARCH = dataclasses.replace(spec, name="team_qwen3_layers", variants=(dataclasses.replace(faithful, config=config),))
""")


def test_checkpoint_format_change_shows_as_a_schema_diff(pytester):
    _, reports = run_suites(pytester, "--snapshot-update", suite="test_schema.py",
                            plugin_source=LAYERED.format(extra=0), plugin_name="layers_v1")
    assert {c["status"] for c in reports["team_qwen3_layers"]["checks"]} == {"passed"}
    _, reports = run_suites(pytester, suite="test_schema.py", plugin_source=LAYERED.format(extra=1),
                            plugin_name="layers_v2")
    checkpoint = checks_by_name(reports["team_qwen3_layers"])["test_checkpoint_schema[team_qwen3_layers-faithful]"]
    assert checkpoint["status"] == "failed", checkpoint
    assert "model.layers.2." in checkpoint["message"] and "snapshot" in checkpoint["message"].lower(), checkpoint["message"]


def test_a_plugin_without_recorded_snapshots_is_told_how_to_record_them(pytester):
    _, reports = run_suites(pytester, suite="test_schema.py", plugin_source=PLUGIN.format(renamed=False),
                            plugin_name="team_qwen3_new")
    for check in reports["team_qwen3"]["checks"]:
        assert check["status"] == "failed", check
        assert "no schema snapshot is recorded" in check["message"] and "--snapshot-update" in check["message"], check
