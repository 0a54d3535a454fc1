"""Train one model of the quality study (dense, or PT with T tracks and block depth D) and report held-out loss.

Every run of a study sees the same batches in the same order (batch i is drawn from a generator seeded by
(seed, i)) and the same number of tokens, so runs differ only in the architecture. A run saves its state
(model, optimizer, step) every `--save-every` seconds and at its end, and resumes from it when started again,
so a run cut by a time limit continues where it stopped. At the end it writes the plait checkpoint
(`checkpoint/`, served by `plait generate`) and `result.json`.

    python -m benchmarks.pt_quality.train --corpus .ptq/corpus.npz --out .ptq/runs --name pt-t4-d4 --tracks 4 --block-depth 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from benchmarks.pt_quality import corpus
from benchmarks.pt_quality.model import PTConfig, PTModel, save_checkpoint

# Model shapes of the study: widths are totals, so every architecture of one size has the same parameter count.
# "h200": 25M parameters, 16 layers (so D = 1, 2, 4, 8 all divide them), head size 32; 4 tracks of 3 query heads
# and 1 KV head each. Sized so five runs at 32M tokens share 4 H200s within a few minutes of one device call.
SIZES = {
    "h200": dict(hidden_size=384, num_layers=16, num_heads=12, num_kv_heads=4, intermediate_size=1024),
    "tiny": dict(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=64),
}


@dataclass(frozen=True)
class TrainConfig:
    tokens: int  # tokens (bytes) seen in training, the same for every run of a study
    batch_size: int = 64
    seq_len: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_windows: int = 512  # held-out windows of seq_len + 1 bytes
    max_seconds: float = float("inf")  # stop early (state saved) when the wall clock runs out
    save_every: float = 60.0  # seconds between state saves

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine down to min_lr_ratio x lr at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_at(data: np.ndarray, step: int, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """[batch, seq_len + 1] random windows of the training bytes, a function of (seed, step) alone."""
    g = np.random.default_rng([cfg.seed, step])
    starts = g.integers(0, data.size - cfg.seq_len - 1, cfg.batch_size)
    windows = np.stack([data[s : s + cfg.seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(windows).to(device, non_blocking=True)


def loss_of(model: PTModel, window: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of [B, S + 1] windows."""
    logits = model(window[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: PTModel, val: np.ndarray, cfg: TrainConfig, device: torch.device, autocast) -> float:
    """Held-out loss in nats per byte over consecutive, non-overlapping windows of the validation files."""
    n = min(cfg.eval_windows, (val.size - 1) // (cfg.seq_len + 1))
    windows = torch.from_numpy(val[: n * (cfg.seq_len + 1)].astype(np.int64).reshape(n, cfg.seq_len + 1)).to(device)
    model.eval()
    total = 0.0
    for chunk in windows.split(cfg.batch_size):
        with autocast():
            total += loss_of(model, chunk).item() * len(chunk)
    model.train()
    return total / n


def make_optimizer(model: PTModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on the matrices (projections, embedding), none on the norms, as is usual."""
    params = dict(model.named_parameters())
    decay = [p for name, p in params.items() if name.endswith("proj") or name == "embed_tokens"]
    rest = [p for name, p in params.items() if not (name.endswith("proj") or name == "embed_tokens")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def train(model_cfg: PTConfig, cfg: TrainConfig, data: np.ndarray, val: np.ndarray, out: str, device: torch.device,
          dtype: torch.dtype = torch.float32, info: dict | None = None, log=print) -> tuple[PTModel, dict]:
    """Run (or resume) one training run in `out`; returns the model and the result (with `info` merged in), also
    written to out/result.json."""
    torch.manual_seed(cfg.seed)
    model = PTModel(model_cfg).to(device)
    opt = make_optimizer(model, cfg)
    state_path, step, curve, elapsed = os.path.join(out, "state.pt"), 0, [], 0.0
    if os.path.exists(state_path):
        state = torch.load(state_path, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, curve, elapsed = state["step"], state["curve"], state["elapsed"]
        log(f"resumed at step {step} of {cfg.steps}")
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    start, saved = time.perf_counter() - elapsed, time.perf_counter()
    while step < cfg.steps and time.perf_counter() - start < cfg.max_seconds:
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        with autocast():
            loss = loss_of(model, batch_at(data, step, cfg, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % max(1, cfg.steps // 100) == 0 or step == cfg.steps:
            curve.append((step, loss.item()))
            log(f"step {step}/{cfg.steps} loss {curve[-1][1]:.4f} lr {cfg.lr_at(step - 1):.2e}")
        if time.perf_counter() - saved > cfg.save_every:
            _save_state(state_path, model, opt, step, curve, time.perf_counter() - start)
            saved = time.perf_counter()
    wall = time.perf_counter() - start
    _save_state(state_path, model, opt, step, curve, wall)
    val_loss = evaluate(model, val, cfg, device, autocast)
    save_checkpoint(model, os.path.join(out, "checkpoint"))
    result = {
        "model": asdict(model_cfg), "train": {k: v for k, v in asdict(cfg).items() if k != "max_seconds"},
        "params": model.num_params(), "steps_done": step, "steps": cfg.steps, "complete": step == cfg.steps,
        "tokens_seen": step * cfg.batch_size * cfg.seq_len, "train_curve": curve, "val_loss": val_loss,
        "val_bits_per_byte": val_loss / math.log(2), "wall_s": wall, "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **(info or {}),
    }
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    log(f"held-out loss {val_loss:.4f} nats/byte ({result['val_bits_per_byte']:.4f} bits/byte), {step} steps, {wall:.0f} s")
    return model, result


def _save_state(path: str, model, opt, step: int, curve: list, elapsed: float) -> None:
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "curve": curve, "elapsed": elapsed}, tmp)
    os.replace(tmp, path)  # a run killed mid-save keeps its previous state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="corpus file from benchmarks.pt_quality.corpus")
    parser.add_argument("--out", required=True, help="folder of the study's runs")
    parser.add_argument("--name", required=True, help="this run's subfolder, e.g. dense or pt-t4-d4")
    parser.add_argument("--size", choices=SIZES, default="h200")
    parser.add_argument("--tracks", type=int, default=1, help="1 = the dense model")
    parser.add_argument("--block-depth", type=int, default=None, help="layers between combines (default: all)")
    parser.add_argument("--combine", choices=("mean", "sum"), default="mean")
    parser.add_argument("--tokens", type=int, default=32_000_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order (held-out windows stay)")
    parser.add_argument("--max-seconds", type=float, default=float("inf"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args()
    shape = SIZES[args.size]
    model_cfg = PTConfig(**shape, num_tracks=args.tracks, block_depth=args.block_depth or shape["num_layers"],
                         combine=args.combine, max_position_embeddings=max(2048, args.seq_len))
    cfg = TrainConfig(args.tokens, args.batch_size, args.seq_len, args.lr, warmup_steps=args.warmup_steps,
                      eval_windows=args.eval_windows, seed=args.seed, max_seconds=args.max_seconds)
    data, val, manifest = corpus.load(args.corpus)
    out = os.path.join(args.out, args.name)
    os.makedirs(out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    train(model_cfg, cfg, data, val, out, torch.device(args.device), getattr(torch, args.dtype),
          info={"name": args.name, "seed": args.seed, "corpus": manifest}, log=lambda msg: print(f"[{args.name}] {msg}", flush=True))


if __name__ == "__main__":
    main()
