"""`plait` command line: generate, serve, bench. Engine and server flags come from the fields of EngineConfig and
ServerConfig (name, default and help in one place)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import types
import typing

from plait.bench.serve_args import add_bench_serve_args
from plait.config import EngineConfig
from plait.executor.executor import EngineFailure
from plait.executor.rendezvous import torchrun_placement
from plait.sampling_params import SamplingParams
from plait.server.config import ServerConfig

_ALIASES = {
    "tensor_parallel_size": ["--tp", "-tp"],
    "pipeline_parallel_size": ["--pp", "-pp"],
    "data_parallel_size": ["--dp", "-dp"],
    "sequence_parallel_size": ["--sp", "-sp"],
    "shift_parallel": ["--shift"],
}


def _flag_type(tp):
    """`int | None` -> int: the type argparse converts the flag's text with."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if isinstance(tp, types.UnionType) else [tp]
    return args[0]


def add_config_args(group: argparse._ArgumentGroup, cls: type, aliases: dict[str, list[str]] | None = None) -> None:
    """One flag per field of a config dataclass: `--field-name`, its type, default and help from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        names = [f"--{f.name.replace('_', '-')}", *(aliases or {}).get(f.name, [])]
        kind = _flag_type(hints[f.name])
        if kind is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata.get("help"))
        else:
            group.add_argument(*names, dest=f.name, type=kind, default=f.default, help=f.metadata.get("help"))


def config_from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    add_config_args(group, EngineConfig, _ALIASES)
    group.add_argument("--profile-comm-dir", default="comm-profile", help="where --profile-comm writes its trace files")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    values["model"] = values["model"] or args.model_pos
    return EngineConfig(**values)


def _generate(args: argparse.Namespace) -> int:
    from plait.entrypoints.llm import LLM

    llm = LLM(**dataclasses.asdict(engine_config_from_args(args)))
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.sampling_seed)
        engine = llm.engine
        if args.chat is not None:
            ids = llm.apply_chat_template([{"role": "user", "content": args.chat}])
        else:
            ids = engine.tokenize(args.prompt)
        request_id = engine.add_request(ids, params)
        printed = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == request_id:
                    text = out.outputs[0].text
                    sys.stdout.write(text[printed:])
                    sys.stdout.flush()
                    printed = len(text)
        sys.stdout.write("\n")
        if engine.cfg.profile_comm:
            from plait.comm.trace import write_profile

            write_profile(engine, args.profile_comm_dir)
    finally:
        llm.shutdown()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from plait.server.launch import run_server

    return run_server(engine_config_from_args(args), config_from_args(ServerConfig, args), args.profile_comm_dir)


def _bench_serve(args: argparse.Namespace) -> int:
    from plait.bench.serve import main as bench_serve

    return bench_serve(args)


def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_engine_args(serve)
    server = serve.add_argument_group("server")
    add_config_args(server, ServerConfig)
    server.add_argument("--disable-frontend-multiprocessing", dest="frontend_multiprocessing", action="store_false",
                        help="vLLM's name for --no-frontend-multiprocessing")
    serve.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description="plait: multi-GPU LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from one prompt or chat message, streaming text to the terminal")
    add_engine_args(gen)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="plain text prompt")
    what.add_argument("--chat", help="one user message, formatted with the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(func=_generate)
    _add_serve(sub)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    latency = bench.add_parser("latency", help="fixed batch: TTFT and TPOT against the hardware floor")
    add_engine_args(latency)
    from plait.bench.latency import add_args as add_latency_args

    add_latency_args(latency)
    latency.set_defaults(func=_engine_command("plait.bench.latency", "main"))
    bench_serve = bench.add_parser("serve", help="load an OpenAI-compatible server and print vLLM's serving metrics")
    add_bench_serve_args(bench_serve)
    bench_serve.set_defaults(func=_bench_serve)
    _add_throughput(bench)
    from plait.bench.shift_steps import add_args as add_shift_steps_args

    shift_steps = bench.add_parser("shift-steps", help="Shift's SP-mode and TP-mode step times by step size, into "
                                                       "the --calibration file (the engine's threshold reads them)")
    add_engine_args(shift_steps)
    add_shift_steps_args(shift_steps)
    shift_steps.set_defaults(func=_engine_command("plait.bench.shift_steps", "main"))
    _add_comm(sub)
    return parser


def _engine_command(module: str, name: str):
    """The handler of a command that runs `module.name(args, engine config)`; the module is imported only when the
    command runs, so `plait --help` stays fast."""
    def handler(args: argparse.Namespace) -> int:
        getattr(importlib.import_module(module), name)(args, engine_config_from_args(args))
        return 0

    return handler


def _add_throughput(bench) -> None:
    from plait.bench.throughput import add_args, add_sweep_args

    throughput = bench.add_parser("throughput", help="every request at once, to completion: output tokens/s")
    add_engine_args(throughput)
    add_args(throughput)
    throughput.set_defaults(func=_engine_command("plait.bench.throughput", "main"))
    tp_sweep = bench.add_parser("tp-sweep", help="throughput at TP = 1, 2, 4 ... over a fixed number of GPUs "
                                                 "(replicas = GPUs / TP): the best degree t_e")
    add_engine_args(tp_sweep)
    add_sweep_args(tp_sweep)
    tp_sweep.set_defaults(func=_engine_command("plait.bench.throughput", "sweep"))


def _add_comm(sub) -> None:
    """The communication tools: profile a run, calibrate the machine, plan a deployment (docs/communication.md)."""
    from plait.bench.comm_profile import add_args as add_profile_args
    from plait.plan.calibrate import add_args as add_calibrate_args
    from plait.plan.command import add_args as add_plan_args

    profile = sub.add_parser("profile", help="one fixed batch with every collective recorded and checked against the model")
    add_engine_args(profile)
    add_profile_args(profile)
    profile.set_defaults(func=_engine_command("plait.bench.comm_profile", "main"))
    calibrate = sub.add_parser("calibrate", help="measure collectives, matrix rate and bandwidth into a calibration file")
    add_calibrate_args(calibrate)
    calibrate.set_defaults(func=_calibrate)
    plan = sub.add_parser("plan", help="predict and rank every TP x PP x DP layout of a model over N GPUs")
    add_plan_args(plan)
    plan.set_defaults(func=_plan)


def _calibrate(args: argparse.Namespace) -> int:
    from plait.plan.calibrate import main as calibrate_main

    return 0 if calibrate_main(args) is not None else 1


def _plan(args: argparse.Namespace) -> int:
    from plait.plan.command import main as plan_main

    return plan_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "node_rank"):  # an engine command: under torchrun (one plait per machine) its variables place it
            vars(args).update(torchrun_placement())
        if getattr(args, "node_rank", 0):  # node k > 0 of a multi-machine run only hosts ranks; node 0 runs the command
            from plait.executor.follower import run_follower

            return run_follower(engine_config_from_args(args))
        return args.func(args)
    except ValueError as e:  # user errors: one clear line, no traceback
        print(f"plait: error: {e}", file=sys.stderr)
        return 2
    except EngineFailure as e:  # a rank died or raised (its number and cause; every rank is stopped), or the
        # server's engine process died
        print(f"plait: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
