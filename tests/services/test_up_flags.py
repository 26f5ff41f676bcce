"""`specsplit up` hands each tier the flags that are its own (draft: --branch-alternatives;
gateway: --round, --no-pipeline, --max-branches), and refuses bad values before it starts anything.

Each command line `up` builds is parsed back by the real `specsplit` parser and turned into the
tier's real config, as the tier's own process does at start."""

from __future__ import annotations

import argparse
import json

import pytest

from draft_service.config import DraftServiceConfig
from gateway.cli import config_from_args
from gateway.config import GatewayConfig
from specsplit import cli, factory, launcher
from specsplit.config import SpeculativeConfig
from target_service.config import TargetServiceConfig

SPEC = json.dumps(launcher.DEFAULT_SPEC)


def _tiers(*flags: str) -> tuple[argparse.Namespace, TargetServiceConfig, DraftServiceConfig, GatewayConfig]:
    """The three configs the processes of `specsplit up MODEL *flags` would build."""
    a = cli.build_parser().parse_args(["up", "m", *flags])
    launcher.check_up_flags(a)
    target, draft, gateway = launcher.tier_commands(a, "/models/m", SPEC, ["m"], 50052, 50053)
    parsed = [cli.build_parser().parse_args(argv[3:]) for argv in (target, draft, gateway)]  # after `-m specsplit.cli`
    assert [p.command for p in parsed] == ["target", "draft", "gateway"]
    t, d, g = parsed
    return (a, TargetServiceConfig.from_args(t, round_timeout_s=t.round_timeout),
            DraftServiceConfig.from_args(d, speculative=SpeculativeConfig.from_any(d.speculative_config)),
            config_from_args(g))


def test_up_flags_reach_the_draft_tier_and_the_gateway() -> None:
    _, target, draft, gateway = _tiers("--branch-alternatives", "2", "--no-pipeline", "--round", "gateway",
                                       "--max-branches", "3")
    assert draft.branch_alternatives == 2
    assert (gateway.pipeline, gateway.round_mode, gateway.max_branches) == (False, "gateway", 3)
    assert gateway.target_addresses == (f"{target.host}:{target.grpc_port}",)
    assert gateway.draft_addresses == (f"{draft.host}:{draft.grpc_port}",)


def test_up_without_the_flags_leaves_each_tier_its_own_defaults() -> None:
    _, _, draft, gateway = _tiers()
    assert draft.branch_alternatives is None  # the draft tier picks per device (1 on a GPU, 0 on a CPU)
    assert (gateway.pipeline, gateway.round_mode, gateway.max_branches) == (True, "direct", 0)


def test_up_reads_the_flags_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECSPLIT_BRANCH_ALTERNATIVES", "0")
    monkeypatch.setenv("SPECSPLIT_NO_PIPELINE", "true")
    monkeypatch.setenv("SPECSPLIT_ROUND", "gateway")
    _, _, draft, gateway = _tiers()
    assert draft.branch_alternatives == 0
    assert (gateway.pipeline, gateway.round_mode) == (False, "gateway")


@pytest.fixture
def nothing_may_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolving the model or starting a process fails the test: the flags are checked first."""

    def started(*args: object, **kw: object) -> None:
        raise AssertionError(f"`up` went on to start with a bad flag: {args}")

    monkeypatch.setattr(factory, "model_folder", started)
    monkeypatch.setattr(launcher.subprocess, "Popen", started)


@pytest.mark.parametrize(("flags", "env", "message"), [
    (["--branch-alternatives", "9"], {}, "branch_alternatives must be an integer in 0..8"),
    (["--branch-alternatives", "-1"], {}, "branch_alternatives must be an integer in 0..8"),
    (["--max-branches", "65"], {}, "max_branches must be an integer in 0..64"),
    ([], {"SPECSPLIT_ROUND": "relay"}, "--round must be one of direct, gateway, got 'relay'"),
])
def test_up_refuses_a_bad_value_before_it_starts_anything(
        nothing_may_start: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        flags: list[str], env: dict[str, str], message: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["up", "m", *flags]) == 2
    assert message in capsys.readouterr().err


def test_up_refuses_an_unknown_round_on_the_command_line(nothing_may_start: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["up", "m", "--round", "relay"])
    assert e.value.code == 2 and "invalid choice: 'relay'" in capsys.readouterr().err
