"""Model loading (local directories only), the built-in tiny model, and weight fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterable

import torch

from hpc_es.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Text the tiny tokenizer is trained on: the built-in tasks' vocabulary, so prompts tokenize compactly.
_TINY_CORPUS = [
    "Using the numbers [44 19 35], create an equation that equals 98.",
    "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once.",
    "Show your work in <think> </think> tags. And return the final answer in <answer> </answer> tags.",
    "Let me solve this step by step.\n<think> 44 + 19 = 63, 63 + 35 = 98 </think>\n<answer> (44 + 19) + 35 </answer>",
    "Q: what is 3 plus 4?\nA: 7",
    "Answer in as few words as possible. What colour is the sky? Blue.",
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.",
    "0123456789 the a an of to in is it and or what which who where when how many",
]

EOS = "<|endoftext|>"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def _tiny_spec(tiny: Any) -> dict[str, Any]:
    return {"arch": tiny.arch, "hidden_size": tiny.hidden_size, "layers": tiny.layers,
            "heads": tiny.heads, "vocab_size": tiny.vocab_size, "format": 1}


def tiny_model_dir(tiny: Any, cache_dir: str) -> str:
    """The cache folder of the tiny model described by ``tiny`` (a TinyModelConfig)."""
    spec = _tiny_spec(tiny)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"tiny-{spec['arch']}-{digest}")


def _train_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, padding_side="left")


def build_tiny_model(tiny: Any, out_dir: str) -> None:
    """Build the tiny model + tokenizer from a config alone and save them with save_pretrained."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = _train_tokenizer(tiny.vocab_size)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, intermediate_size=2 * tiny.hidden_size,
        num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads, num_key_value_heads=tiny.heads,
        max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.02,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id)
    config = Qwen2Config(**common) if tiny.arch == "qwen2" else LlamaConfig(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_tiny_model(tiny: Any, cache_dir: str) -> str:
    """Return the tiny model's folder, building it once (atomically: temp folder, then rename)."""
    target = tiny_model_dir(tiny, cache_dir)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=cache_dir)
    try:
        build_tiny_model(tiny, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_model_dir(path: str) -> None:
    """Fail early with one clear message instead of a transformers traceback or a hub download."""
    if not os.path.exists(path):
        raise ModelError(f"model directory '{path}' does not exist (hpc_es only loads local directories)")
    if not os.path.isdir(path):
        raise ModelError(f"model path '{path}' is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelError(f"model directory '{path}' is not readable")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"model directory '{path}' has no config.json; is it a Hugging Face model folder?")


def load_model(path: str, dtype: torch.dtype | str = "auto", device: str = "cpu") -> torch.nn.Module:
    """Load a causal LM from a local folder (never the hub), in eval mode, without gradients.

    On a GPU the weights are read straight onto the device (``device_map``, which transformers serves
    through ``accelerate``), so 8 ranks of a node do not each stage a 7B model in host RAM first; without
    ``accelerate`` they go through host memory and a warning says so.  On the CPU nothing changes.
    """
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    direct = torch.device(device).type != "cpu" and _has_accelerate()
    if torch.device(device).type != "cpu" and not direct:
        _warn_once("accelerate is not installed: the model is loaded into host memory, then moved to the "
                   "device (pip install accelerate, or hpc_es[gpu], loads it straight onto the GPU)")
    extra: dict[str, Any] = {"device_map": {"": str(torch.device(device))}} if direct else {}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
    except Exception as e:  # transformers raises many types; the user needs the cause in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model from '{path}': {msg}") from None
    model.to(device)  # a no-op when device_map put it there
    model.eval()
    model.requires_grad_(False)
    return model


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        logging.getLogger("hpc_es").warning(msg)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    check_model_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load tokenizer from '{path}': {msg}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def named_params(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters by name, tied weights once, sorted so every process walks them alike."""
    return sorted(model.named_parameters(), key=lambda kv: kv[0])


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes: equal iff bit-identical."""
    return fingerprint_named(named_params(model))


def fingerprint_named(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``fingerprint`` of (name, tensor) pairs in the given order (a model's, or its master's)."""
    h = hashlib.sha256()
    for name, p in items:
        h.update(f"{name}|{str(p.dtype).removeprefix('torch.')}|{tuple(p.shape)}|".encode())
        h.update(tensor_bytes(p))
    return h.hexdigest()


# Weights digest: a checksum computed where the weights live (no copy to the host), exact on any device.
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_M1, _M2, _M3 = -7046029254386353131, -4658895280553007687, -7723592293110705685  # 64-bit odd constants
DIGEST_CHUNK = 1 << 24  # elements per step: bounds the int64 scratch (8 bytes per element, a few copies)


def _wrap64(x: int) -> int:
    """An integer as the signed 64-bit value with the same low 64 bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >> 63 else x


def _mix_sum(words: torch.Tensor, start: int) -> torch.Tensor:
    """Sum over i of mix(word_i, start + i) modulo 2**64, as an int64 0-d tensor on the words' device.

    Only integer multiply, add, xor and shift: exact and order-free (a wrapping sum is associative), so
    every device and every reduction order gives the same value.  Each element is mixed with its index
    before the sum, so a change of one bit anywhere, or two elements swapped, changes the sum except with
    probability ~2**-64.
    """
    x = words.to(torch.int64)
    x = x * _M1 + (torch.arange(start, start + x.numel(), device=x.device, dtype=torch.int64) + 1) * _M2
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)  # logical shift: the arithmetic >> of int64, masked
    x = x * _M3
    x = x ^ ((x >> 29) & 0x7FFFFFFFF)
    x = x * _M1
    x = x ^ ((x >> 32) & 0xFFFFFFFF)
    return x.sum()


def _digest_tensor(t: torch.Tensor, chunk: int) -> torch.Tensor:
    flat = t.detach().contiguous().view(-1)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    if flat.numel() == 0:
        return total
    words = flat.view(_INT_VIEW[flat.element_size()])
    for s in range(0, words.numel(), chunk):
        total += _mix_sum(words[s:s + chunk], s)
    return total


def tensor_digest(t: torch.Tensor, chunk: int = DIGEST_CHUNK) -> int:
    """A 64-bit checksum of one tensor's bits, computed on its device; the same on CPU and GPU and for
    any ``chunk``."""
    return int(_digest_tensor(t, chunk).item())


def weights_digest(items: Iterable[tuple[str, torch.Tensor]], chunk: int = DIGEST_CHUNK) -> str:
    """SHA-256 over each tensor's name, dtype, shape and device-side 64-bit checksum (``tensor_digest``).

    What the cross-rank check compares: from a GPU only one int64 per tensor crosses to the host, in one
    transfer per device.
    """
    items = list(items)
    sums = [_digest_tensor(t, chunk) for _, t in items]
    values: dict[int, int] = {}
    by_device: dict[torch.device, list[int]] = {}
    for k, v in enumerate(sums):
        by_device.setdefault(v.device, []).append(k)
    for idx in by_device.values():
        for k, v in zip(idx, torch.stack([sums[k] for k in idx]).cpu().tolist()):
            values[k] = v
    h = hashlib.sha256()
    for k, (name, t) in enumerate(items):
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        h.update(int(values[k]).to_bytes(8, "little", signed=True))
    return h.hexdigest()


def fingerprint_dir(path: str) -> str:
    return fingerprint(load_model(path, dtype="auto", device="cpu"))
