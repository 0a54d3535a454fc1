"""Serve each trained checkpoint with plait and let it continue a Python prompt: the checkpoints load and generate.

Byte-level models have no tokenizer: the prompt goes in as byte ids and the output comes back as bytes. A PT
checkpoint runs on `--tp` ranks as the track plan lays it out (4 tracks on 4 GPUs: one track per GPU).

    python -m benchmarks.pt_quality.sample --runs .ptq/runs --device cuda                      # every run, 1 rank
    python -m benchmarks.pt_quality.sample --runs .ptq/runs --names pt-t4-d4 --tp 4 --device cuda  # a track per GPU
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from plait import LLM, SamplingParams

PROMPT = "import torch\n\n\ndef softmax(x: torch.Tensor) -> torch.Tensor:\n"


def sample(folder: str, tp: int, device: str, max_tokens: int) -> str:
    llm = LLM(folder, tensor_parallel_size=tp, device=device, max_model_len=1024)
    try:
        out = llm.generate([list(PROMPT.encode())], SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    finally:
        llm.shutdown()
    return bytes(out[0].outputs[0].token_ids).decode("utf-8", errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--tp", type=int, default=1, help="ranks per checkpoint (PT: tracks are laid over them)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--names", nargs="*", default=None, help="runs to serve (default: every run with a checkpoint)")
    args = parser.parse_args()
    path = os.path.join(args.runs, "samples.json")
    samples = {}
    if os.path.exists(path):  # several calls (1 rank, then 4) add to one file
        with open(path) as f:
            samples = json.load(f)
    for ckpt in sorted(glob.glob(os.path.join(args.runs, "*", "checkpoint"))):
        name = os.path.basename(os.path.dirname(ckpt))
        if args.names is None or name in args.names:
            text = sample(ckpt, args.tp, args.device, args.max_tokens)
            samples[f"{name} tp={args.tp}"] = {"prompt": PROMPT, "completion": text}
            print(f"--- {name} (tp={args.tp})\n{PROMPT}{text}", flush=True)
    with open(path, "w") as f:
        json.dump(samples, f, indent=2)


if __name__ == "__main__":
    main()
