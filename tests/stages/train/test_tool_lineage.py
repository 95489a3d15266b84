"""A version published from a multi-turn run records its tools (names, schemas) and the multi_turn settings in
its lineage; a single-turn run's lineage has no multi_turn entry."""

from __future__ import annotations

from pathlib import Path

from config import load_config
from ground.model_files import fingerprint
from registry import open_registry
from stages.publish import publish
from tests.synthetic_lora import write_lora

CALCULATOR_YAML = Path(__file__).resolve().parents[3] / "examples" / "tools" / "calculator_tool.yaml"


def _publish(tmp_path, tiny_model_dir, run_id, *overrides):
    store = tmp_path / "store"
    cfg = load_config(None, [f"registry.uri={store}", "publish.name=calc", *overrides])
    train = {"adapter_dir": str(write_lora(tmp_path / f"adapter-{run_id}", seed=1)), "steps": 1}
    staged = {"source_dir": str(tiny_model_dir), "fingerprint": fingerprint(tiny_model_dir)}
    out = publish(cfg, run_id, staged, train, {"publish": True, "decision": "publish: test"})
    return open_registry(str(store), mirror_mlflow=False).get_version("calc", out["version"]).lineage


def test_multi_turn_run_records_its_tools_and_settings(tmp_path, tiny_model_dir):
    key = "actor_rollout_ref.rollout.multi_turn"
    lineage = _publish(tmp_path, tiny_model_dir, "run-mt", f"{key}.enable=True", "data.return_raw_chat=True",
                       f"{key}.tool_config_path={CALCULATOR_YAML}", f"{key}.max_assistant_turns=3")
    recorded = lineage["multi_turn"]
    assert [t["name"] for t in recorded["tools"]] == ["calculator"]
    assert recorded["tools"][0]["class_name"] == "calculator"
    schema = recorded["tools"][0]["schema"]
    assert schema["type"] == "function" and schema["function"]["parameters"]["required"] == ["expression"]
    assert recorded["settings"]["max_assistant_turns"] == 3 and recorded["settings"]["format"] == "hermes"
    assert recorded["settings"]["tool_config_path"] == str(CALCULATOR_YAML)


def test_single_turn_run_has_no_multi_turn_lineage(tmp_path, tiny_model_dir):
    assert "multi_turn" not in _publish(tmp_path, tiny_model_dir, "run-st")
