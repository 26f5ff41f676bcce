"""`specsplit target`: build the config from the flags and serve until SIGTERM."""

from __future__ import annotations

import argparse

from specsplit.serving.tier import run_tier
from target_service.config import TargetServiceConfig
from target_service.server import start_target


def run(a: argparse.Namespace) -> int:
    cfg = TargetServiceConfig.from_args(a, round_timeout_s=a.round_timeout)
    return run_tier(lambda: start_target(cfg), cfg.shutdown_grace_seconds)
