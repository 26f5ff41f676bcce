"""`specsplit eagle train TARGET --out DIR`: train an EAGLE head on this machine's CPU."""

from __future__ import annotations

import argparse

from specsplit.speculation.eagle.train import TrainConfig, default_out, train_head


def add_eagle_subparser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eagle", help="EAGLE heads: train one for a target")
    cmds = p.add_subparsers(dest="eagle_command", required=True)
    t = cmds.add_parser("train", help="train an EAGLE-3 (or EAGLE-1) head for TARGET on CPU")
    d = TrainConfig()
    t.add_argument("target", help="catalogue name or model folder of the target")
    t.add_argument("--out", default=None, help="output folder (default: ~/.cache/specsplit/eagle/TARGET-METHOD)")
    t.add_argument("--method", choices=("eagle3", "eagle"), default=d.method)
    t.add_argument("--data", choices=("auto", "stdlib", "self", "mix"), default=d.data,
                   help="training text: Python standard library source, the target's own answers, or mix "
                        "(its answers to coding requests, then stdlib up to --sequences; auto: stdlib for "
                        "code models)")
    t.add_argument("--sequences", type=int, default=d.sequences, help="training sequences")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    t.add_argument("--answer-tokens", type=int, default=d.answer_tokens,
                   help="most new tokens per own answer (self, mix; default: --seq-len)")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch", type=int, default=d.batch, help="sequences per optimiser step")
    t.add_argument("--unroll", type=int, default=d.unroll, help="drafted steps trained per position")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--draft-vocab", type=int, default=d.draft_vocab, help="EAGLE-3 draft vocabulary size")
    t.add_argument("--intermediate-size", type=int, default=d.intermediate_size, help="head MLP width")
    t.add_argument("--format", choices=("safetensors", "bin"), default=d.fmt, dest="fmt")
    t.add_argument("--seed", type=int, default=d.seed)


def run_eagle(a: argparse.Namespace) -> int:
    cfg = TrainConfig(method=a.method, data=a.data, sequences=a.sequences, seq_len=a.seq_len, answer_tokens=a.answer_tokens,
                      epochs=a.epochs,
                      batch=a.batch, unroll=a.unroll, lr=a.lr, draft_vocab=a.draft_vocab,
                      intermediate_size=a.intermediate_size, seed=a.seed, fmt=a.fmt)
    train_head(a.target, a.out or default_out(a.target, a.method), cfg)
    return 0
