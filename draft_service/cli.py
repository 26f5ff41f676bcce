"""`specsplit draft`: build the config from the flags and serve until SIGTERM."""

from __future__ import annotations

import argparse

from draft_service.config import DraftServiceConfig
from draft_service.server import start_draft
from specsplit.config import SpeculativeConfig
from specsplit.serving.tier import run_tier


def run(a: argparse.Namespace) -> int:
    sc = SpeculativeConfig.from_any(a.speculative_config)
    if sc is None:
        raise SystemExit("specsplit draft needs --speculative-config (method draft_model, ngram, eagle or eagle3)")
    cfg = DraftServiceConfig.from_args(a, speculative=sc)
    return run_tier(lambda: start_draft(cfg), cfg.shutdown_grace_seconds)
