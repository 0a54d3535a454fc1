"""GGUF weights as Hugging Face parameters: llama.cpp names mapped back, quantized blocks dequantized on read.

Dequantization is per tensor and per row range, when a layer asks for it, so loading never holds more than one
float32 tensor beyond the model itself. The result matches what transformers builds from the same file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from plait.models.loader import WeightSource, slice_bounds

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp stores Llama 3's rope frequency factors; transformers derives them from the config instead.
_DERIVED = {"rope_freqs"}
_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_TENSOR_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<kind>\w+)\.(?P<suffix>weight|bias)")


@dataclass(frozen=True, eq=False)
class GGUFWeight:
    """One GGUF tensor. `rope_heads` > 0 means its rows are in llama.cpp's rotary order, interleaved per head."""

    tensor: ReaderTensor
    shape: tuple[int, ...]
    rope_heads: int = 0

    def read(self, dim: int = 0, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = slice_bounds(self.tensor.name, self.shape, dim, start, end)
        if dim != 0:
            return self._rows(0, self.shape[0]).narrow(dim, start, end - start)
        if not self.rope_heads:
            return self._rows(start, end)
        # The permutation stays inside a head, so dequantize the whole heads the slice touches.
        head = self.shape[0] // self.rope_heads
        lo, hi = start // head * head, -(-end // head) * head
        return self._rows(lo, hi)[start - lo : end - lo]

    def _rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo:hi], cut from the raw blocks before dequantizing (a row is always whole blocks)."""
        rows = dequantize(self.tensor.data[lo:hi], self.tensor.tensor_type)
        if not rows.flags.writeable:  # unquantized types come back as a view of the read-only file mapping
            rows = rows.copy()
        w = torch.from_numpy(rows)
        if self.rope_heads:
            # llama.cpp interleaves the two rotary halves of a head row by row (a0 b0 a1 b1 ...);
            # Hugging Face keeps them as two blocks (a0 a1 ... b0 b1 ...).
            head = self.shape[0] // self.rope_heads
            w = w.reshape(-1, head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        return w


def _hf_name(gguf_name: str) -> tuple[str | None, str]:
    """(Hugging Face name, llama.cpp kind) of a tensor; the name is None for a tensor the config implies."""
    m = _TENSOR_NAME.fullmatch(gguf_name)
    layer, kind = (m["layer"], m["kind"]) if m else (None, gguf_name)
    if layer is None and kind in _DERIVED:
        return None, kind
    base = _GLOBAL.get(kind) if layer is None else _LAYER.get(kind)
    if m is None or base is None:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in a Llama-family decoder")
    prefix = "" if layer is None else f"model.layers.{layer}."
    return f"{prefix}{base}.{m['suffix']}", kind


def iter_gguf_weights(path: str) -> Iterator[tuple[str, WeightSource]]:
    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF {path!r} has architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}")
    # llama.cpp's converter permutes q/k rows only for its "llama" architecture (Llama, Mistral, SmolLM...).
    rope_heads = {}
    if arch == "llama":
        heads = _field(reader, "llama.attention.head_count")
        kv_heads = _field(reader, "llama.attention.head_count_kv", default=heads)  # absent in multi-head files
        rope_heads = {"attn_q": heads, "attn_k": kv_heads}
    for tensor in reader.tensors:
        name, kind = _hf_name(tensor.name)
        if name is None:
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
        yield name, GGUFWeight(tensor, shape, rope_heads.get(kind, 0))


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value; required unless a default is given."""
    field = reader.get_field(key)
    if field is not None:
        return field.contents()
    if default is None:
        raise ValueError(f"GGUF metadata has no {key!r}")
    return default
