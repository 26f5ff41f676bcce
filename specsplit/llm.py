"""`LLM`: the vLLM-style in-process API over the speculative engine."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from specsplit.config import SpeculativeConfig
from specsplit.factory import default_device, load_drafter, load_target
from specsplit.outputs import RequestOutput
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.engine import SpecEngine

PromptType = str | dict[str, Any]


class LLM:
    """Load a target (and optionally a drafter) and generate with lossless speculation.

    Without `speculative_config` it decodes plainly with the same engine, which is the
    baseline every benchmark compares against.
    """

    def __init__(
        self,
        model: str,
        speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        enforce_eager: bool = False,
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_bytes: int | None = None,
        device: str | None = None,
    ) -> None:
        self.speculative_config = SpeculativeConfig.from_any(speculative_config)
        self.enforce_eager = enforce_eager  # CUDA graphs are only captured on GPU
        torch.manual_seed(seed)
        dev = torch.device(device) if device else default_device()
        common = dict(dtype=dtype, device=dev, max_model_len=max_model_len,
                      kv_cache_bytes=kv_cache_memory_bytes, gpu_memory_utilization=gpu_memory_utilization,
                      enforce_eager=enforce_eager)
        self.target, self.tokenizer = load_target(model, tensor_parallel_size=tensor_parallel_size, **common)
        drafter = None
        sc = self.speculative_config
        if sc is not None:
            drafter = load_drafter(sc, self.tokenizer, self.target.runner.cfg.vocab_size, **common,
                                   target=self.target, target_model=model)
        self.engine = SpecEngine(
            self.target, drafter, self.tokenizer,
            num_speculative_tokens=sc.num_speculative_tokens if sc else 0,
            adaptive=sc.adaptive if sc else False, max_num_seqs=max_num_seqs,
        )
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (a no-op on one device)."""
        self.target.runner.shutdown()
        drafter_runner = getattr(self.engine.drafter, "runner", None)
        if drafter_runner is not None:
            drafter_runner.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for one or many prompts (strings or {"prompt_token_ids": [...]}) together."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        order: list[str] = []
        try:
            for p, sp in zip(prompts, params, strict=True):
                text, ids = self._encode(p)
                rid = str(next(self._ids))
                self.engine.add_request(rid, text, ids, sp)
                order.append(rid)
        except Exception:  # a bad prompt: drop the ones already queued, or a later call runs them
            for rid in order:
                self.engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = _progress(len(order), use_tqdm)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for rid in order:
                if rid not in results:
                    self.engine.abort(rid)
        return [results[r] for r in order]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one or many conversations, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = []
        for c in convs:
            text = self.apply_chat_template(c, add_generation_prompt)
            # the template already holds the special tokens: do not add BOS twice
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of ints")
                return prompt.get("prompt"), list(ids)
            if isinstance(prompt.get("prompt"), str):
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError("a prompt must be a string, {'prompt': str} or {'prompt_token_ids': [...]}")


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total <= 1:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="req")
