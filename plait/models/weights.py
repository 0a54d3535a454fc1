"""Checkpoint tensors -> this rank's parameters.

Each loadable layer exposes `expected_shape(name, kind)` and `load(name, kind, read)`; `read(dim, start, end)`
returns only the slice the layer asks for. Every expected tensor must arrive exactly once with the checkpoint's
full shape, otherwise loading stops with a ValueError naming the tensor. A model whose layers stack several
checkpoint modules (a Parallel Track model's tracks) says where each goes (`grouped_target`), and those layers name
the tensors they expect (`tensor_names`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

_MERGED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _target(model: nn.Module, hf_name: str) -> tuple[str, str, str] | None:
    """HF name -> (module path, segment name, kind) in plait's model, or None if the tensor is not ours."""
    if _IGNORED.search(hf_name):
        return None
    path, kind = hf_name.removeprefix("model.").rsplit(".", 1)
    if not _held(model, path):
        return None  # a pipeline stage does not hold this layer (or embedding, norm, head)
    if path == "lm_head" and model.cfg.tie_word_embeddings:
        return None
    *parent, leaf = path.split(".")
    module = ".".join([*parent, _MERGED[leaf]]) if leaf in _MERGED else path
    if hasattr(model, "grouped_target"):
        module, leaf = model.grouped_target(module, leaf)
    return module, leaf, kind


def _held(model: nn.Module, path: str) -> bool:
    """Whether this rank's model holds `path`: decoder layers outside the stage, dropped parts and tensors the model
    says it does not hold are skipped."""
    if hasattr(model, "holds") and not model.holds(path):
        return False  # the model keeps part of the checkpoint by its own rule (a Parallel Track rank's tracks)
    top, _, rest = path.partition(".")
    if top in getattr(model, "dropped", ()):
        return False
    if top == "layers":
        index = rest.split(".", 1)[0]
        return index in model.layers or not (index.isdigit() and int(index) < model.cfg.num_layers)
    return True


def expected_tensors(model: nn.Module) -> set[tuple[str, str, str]]:
    expected = set()
    for path, module in model.named_modules():
        if not hasattr(module, "load") or (module is getattr(model, "lm_head", None) and model.cfg.tie_word_embeddings):
            continue
        leaf = path.rsplit(".", 1)[-1]
        if hasattr(module, "tensor_names"):
            names = module.tensor_names(leaf)
        else:
            names = [s.name for s in module.segments] if hasattr(module, "segments") else [leaf]
        kinds = ["weight"] + (["bias"] if getattr(module, "bias", None) is not None else [])
        expected |= {(path, n, k) for n in names for k in kinds}
    return expected


@torch.no_grad()
def load_weights(model: nn.Module, weights: Iterable[tuple[str, object]]) -> None:
    expected, seen = expected_tensors(model), set()
    for hf_name, src in weights:
        target = _target(model, hf_name)
        if target is None:
            continue
        if target not in expected:
            raise ValueError(f"checkpoint tensor {hf_name!r} has no place in a {model.cfg.architecture} model of this config")
        path, name, kind = target
        module = model.get_submodule(path)
        want = module.expected_shape(name, kind)
        if tuple(src.shape) != tuple(want):
            raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(src.shape)}, the config implies {tuple(want)}")
        module.load(name, kind, src.read)
        seen.add(target)
    missing = sorted(expected - seen)
    if missing:
        names = ", ".join(f"{p}.{n}.{k}" for p, n, k in missing[:5])
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {names}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of the right shapes, for benchmarks of big models without a checkpoint on disk."""
    for name, p in model.named_parameters():
        gen = torch.Generator(device=p.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.uniform_(-0.02, 0.02, generator=gen)
