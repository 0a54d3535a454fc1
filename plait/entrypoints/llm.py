"""The offline API with vLLM's names: `LLM(model=...).generate(prompts, SamplingParams(...))` and `.chat(...)`."""

from __future__ import annotations

import dataclasses

from tqdm.auto import tqdm

from plait.config import EngineConfig
from plait.engine.data_parallel import make_engine
from plait.outputs import RequestOutput
from plait.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int] | dict


class LLM:
    """Keyword arguments are `EngineConfig` fields (vLLM's EngineArgs names: tensor_parallel_size, dtype, ...)."""

    def __init__(self, model: str | None = None, **kwargs):
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown LLM argument(s) {unknown}; known: {sorted(known)}")
        self.engine = make_engine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in the order of the prompts.

        A prompt is a string, a list of token ids, or {"prompt": str} / {"prompt_token_ids": [...]}. Every
        prompt is validated before any runs, so one bad prompt fails the call without starting the others.
        """
        single = isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = sampling_params or SamplingParams()
        one = not isinstance(params, list)
        # as vLLM's LLM: only each request's final output is built
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in ([params] if one else params)]
        params = params * len(prompts) if one else params
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.engine.tokenize(_unwrap(p)) for p in prompts]
        for i in ids:
            self.engine._check_prompt(i)
        order = [self.engine.add_request(i, p) for i, p in zip(ids, params)]
        return self._run(order, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: use generate() with a plain prompt")
        text = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="Processed prompts", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [done[r] for r in order]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _unwrap(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt["prompt_token_ids"]
        return prompt["prompt"]
    return prompt
