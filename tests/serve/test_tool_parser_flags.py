"""`pipeline serve --tool-call-parser NAME` / `serve.tool_call_parser`: the names are vLLM's own (its registry of
tool parsers), an unknown one is refused before anything starts, and the flags reach the engine in both modes.
The real servers with the flag run in tests/serve/test_tool_passthrough.py."""

from __future__ import annotations

import pytest

from config.loader import load_config
from ground.errors import ConfigError
from ground.vllm_tool_parsers import AUTO_TOOL_CHOICE_FLAG, known_tool_parsers, tool_parser_args


def test_the_names_are_vllms_registry_and_an_unknown_one_is_refused_with_all_of_them():
    from vllm.tool_parsers import ToolParserManager

    assert known_tool_parsers() == ToolParserManager.list_registered() and "hermes" in known_tool_parsers()
    assert tool_parser_args(None, "here") == []
    assert tool_parser_args("hermes", "here") == [AUTO_TOOL_CHOICE_FLAG, "--tool-call-parser", "hermes"]
    with pytest.raises(ConfigError) as refused:
        tool_parser_args("hermez", "the test")
    message = str(refused.value)
    assert "'hermez'" in message and "(from the test)" in message
    assert all(name in message for name in known_tool_parsers())


def test_the_config_key_is_checked_when_the_config_loads():
    assert load_config(None, []).serve.tool_call_parser is None
    assert load_config(None, ["serve.tool_call_parser=hermes"]).serve.tool_call_parser == "hermes"
    with pytest.raises(ConfigError, match=r"serve\.tool_call_parser.*'hermez'.*vLLM has no tool-call parser.*hermes"):
        load_config(None, ["serve.tool_call_parser=hermez"])


def test_the_cli_refuses_an_unknown_parser_before_it_starts_anything(capsys, tmp_path):
    from pipeline.cli import cli_entry

    # a base folder that does not exist: the parser is refused first, so the message is about the parser
    code = cli_entry(["serve", "--base", str(tmp_path / "no-model"), "--tool-call-parser", "hermez"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "'hermez'" in err and "--tool-call-parser" in err and "hermes" in err


def _engine_args(settings: dict):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from serve.replicas.replica import LoraReplica

    return make_arg_parser(FlexibleArgumentParser()).parse_args(LoraReplica._engine_cli_args(settings))


def test_a_replica_engine_gets_the_parser_and_a_bad_name_is_refused_before_ray_starts(tmp_path):
    from serve.replicas.app import plan_replicas

    settings = {"base_dir": str(tmp_path), "base_name": "b", "max_loras": 1, "max_cpu_loras": 1, "max_lora_rank": 8,
                "max_model_len": 256, "dtype": "float32", "kv_cache_bytes": 1 << 26}
    plain = _engine_args(settings)
    assert not plain.enable_auto_tool_choice and plain.tool_call_parser is None
    parsed = _engine_args({**settings, "tool_call_parser": "hermes"})
    assert parsed.enable_auto_tool_choice and parsed.tool_call_parser == "hermes"
    # checked before the base folder (which does not exist here), the registry or Ray
    with pytest.raises(ConfigError, match="'hermez'.*serve.tool_call_parser"):
        plan_replicas(tmp_path / "no-model", str(tmp_path / "registry"), tool_call_parser="hermez")


class _Started(Exception):
    """Raised by the recorders below in place of starting a server."""


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_serve_stage_passes_the_key_in_both_modes(monkeypatch, tmp_path, replicas):
    import serve.replicas.app
    import serve.server
    from stages.serve_stage import serve_published

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise _Started

    monkeypatch.setattr(serve.server, "start_server", record)
    monkeypatch.setattr(serve.replicas.app, "start_replicated", record)
    cfg = load_config(None, ["serve.enable=true", "serve.tool_call_parser=hermes", f"serve.replicas={replicas}"])
    with pytest.raises(_Started):
        serve_published(cfg, {"model_dir": str(tmp_path)}, {"published": True, "registry": str(tmp_path)}, tmp_path)
    assert seen["tool_call_parser"] == "hermes"
