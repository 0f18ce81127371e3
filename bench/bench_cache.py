"""Prefix-cache routing: each prefill policy, and vllm-router's cache_aware, on one workload.

Every router gets a fresh fleet of identical simulated instances (``moriio-proxy sim``):
4 prefills that keep a prefix cache and spend ``--prefill-token-latency`` per prompt token
they compute, and 2 decodes. Each then serves the same conversations (a few long system
prompts, multi-turn conversations whose every turn extends the last) from closed-loop
chat clients. Reported per router: the prefills' prefix-cache hit rate (their own
counters), mean and p99 TTFT, and how evenly the prefills were loaded.

    .venv/bin/python bench/bench_cache.py                    # every router (~6 min)
    .venv/bin/python bench/bench_cache.py --routers round_robin,cache_aware --conversations 40
    .venv/bin/python bench/bench_cache.py --proxy-arg=--balance-abs-threshold=4
    .venv/bin/python bench/bench_cache.py --update           # the committed results

Results go to bench/results/scratch/<time>/ (git-ignored) unless --update, which also
writes the committed bench/results/cache.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import options, runinfo  # noqa: E402
from bench.cache.measure import RouterResult, run_router  # noqa: E402
from bench.cache.report import check_targets, markdown  # noqa: E402
from bench.cache.workload import Conversation, WorkloadSpec, build  # noqa: E402
from bench.overhead import vllm_router  # noqa: E402
from bench.overhead.targets import SimArgs, Target, start_moriio_proxy, start_vllm_router  # noqa: E402
from bench.processes import StartError  # noqa: E402
from moriio_proxy.sim import chat_prompt_text, expected_text  # noqa: E402

POLICIES = ("round_robin", "least_loaded", "session", "cache_aware")
ROUTERS = (*POLICIES, "vllm-router")
# vllm-router's cache_aware for prefill; decode by power of two choices, as moriio-proxy's
# default least_loaded does, so that only the prefill choice differs.
VLLM_ROUTER_ARGS = ("--prefill-policy", "cache_aware", "--decode-policy", "power_of_two")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated")
    spec = WorkloadSpec()
    parser.add_argument("--conversations", type=int, default=spec.conversations)
    parser.add_argument("--users", type=int, default=16, help="concurrent conversations")
    parser.add_argument("--system-prompts", type=int, default=spec.system_prompts)
    parser.add_argument("--answer-tokens", type=int, default=spec.answer_tokens)
    parser.add_argument("--seed", type=int, default=spec.seed, help="of the workload")
    parser.add_argument("--prefills", type=int, default=4, help="simulated P per router")
    parser.add_argument("--decodes", type=int, default=2, help="simulated D per router")
    parser.add_argument(
        "--prefill-token-latency",
        type=float,
        default=0.0001,
        help="seconds a P spends per prompt token it computes (cached ones cost nothing)",
    )
    parser.add_argument(
        "--token-latency", type=float, default=0.005, help="seconds per generated token (D)"
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument(
        "--gpu-blocks", type=int, default=650, help="KV blocks per P: its prefix cache's size"
    )
    vllm_router.add_arguments(parser)
    parser.add_argument(
        "--proxy-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra moriio-proxy serve argument for every policy (repeatable), "
        "e.g. --proxy-arg=--balance-abs-threshold=4",
    )
    parser.add_argument(
        "--router-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra vllm-router argument (repeatable), e.g. --router-arg=--cache-threshold=0.5",
    )
    options.add_results_options(parser, "cache")
    args = parser.parse_args(argv)
    vllm_router.check_arguments(parser, args)
    options.check_out(parser, args.out)
    args.router_list = [r.strip() for r in args.routers.split(",") if r.strip()]
    for name in args.router_list:
        if name not in ROUTERS:
            parser.error(f"--routers: unknown {name!r} (known: {', '.join(ROUTERS)})")
    return args


def workload(args: argparse.Namespace) -> tuple[list[Conversation], dict[str, Any]]:
    """The conversations, and what they add up to (prompt sizes in tokens)."""
    spec = WorkloadSpec(
        conversations=args.conversations,
        system_prompts=args.system_prompts,
        answer_tokens=args.answer_tokens,
        seed=args.seed,
    )
    conversations = build(spec)
    prompt_tokens: list[int] = []
    for conv in conversations:
        answers: list[str] = []
        for turn in range(len(conv.questions)):
            text = chat_prompt_text(conv.messages(answers, turn))
            prompt_tokens.append(len(text.split()))
            answers.append(expected_text(text, spec.answer_tokens))
    facts = {
        "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
        "requests": len(prompt_tokens),
        "prompt_tokens_mean": round(statistics.fmean(prompt_tokens)),
        "prompt_tokens_max": max(prompt_tokens),
        "prompt_tokens_total": sum(prompt_tokens),
    }
    return conversations, facts


def sim_args(args: argparse.Namespace) -> SimArgs:
    common = ["--block-size", str(args.block_size), "--enable-prompt-tokens-details"]
    return {
        "P": [
            *common,
            "--prefill-token-latency",
            str(args.prefill_token_latency),
            "--num-gpu-blocks-override",
            str(args.gpu_blocks),
        ],
        "D": [*common, "--token-latency", str(args.token_latency)],
    }


def start(name: str, args: argparse.Namespace, logs: Path, router: str | None) -> Target:
    sims = sim_args(args)
    if name == "vllm-router":
        assert router is not None
        return start_vllm_router(
            router,
            "READ",
            logs,
            args.prefills,
            args.decodes,
            router_args=[*VLLM_ROUTER_ARGS, *args.router_arg],
            sim_args=sims,
        )
    extra = ["--prefill-policy", name, *args.proxy_arg]
    return start_moriio_proxy(
        "READ", logs, args.prefills, args.decodes, extra, name=name, sim_args=sims
    )


def describe_run(
    args: argparse.Namespace, located: vllm_router.Located, facts: dict[str, Any]
) -> dict[str, Any]:

    spec = facts["spec"]
    p_tokens = args.gpu_blocks * args.block_size
    return {
        "when": runinfo.now(),
        "machine": runinfo.machine(),
        "moriio_proxy": runinfo.moriio_proxy(),
        "vllm_router": vllm_router.describe(located),
        "python": platform.python_version(),
        "command": runinfo.command("bench_cache.py"),
        "workload": (
            f"{spec['conversations']} conversations ({facts['requests']} chat requests) by "
            f"{args.users} concurrent users; {spec['system_prompts']} system prompts of "
            f"{spec['system_words'][0]}-{spec['system_words'][1]} words; "
            f"{spec['turns'][0]}-{spec['turns'][1]} turns each, questions of "
            f"{spec['question_words'][0]}-{spec['question_words'][1]} words, answers of "
            f"{spec['answer_tokens']} tokens; prompts of {facts['prompt_tokens_mean']} tokens "
            f"on average (at most {facts['prompt_tokens_max']}); seed {spec['seed']}."
        ),
        "fleet": (
            f"{args.prefills} simulated P, {args.decodes} simulated D, READ mode; each P "
            f"computes a prompt token in {args.prefill_token_latency * 1000:g} ms, one prompt "
            f"at a time, and caches {args.gpu_blocks} blocks of {args.block_size} tokens "
            f"({p_tokens} tokens, {p_tokens / facts['prompt_tokens_mean']:.0f} mean prompts); "
            f"D emits a token every {args.token_latency * 1000:g} ms. moriio-proxy: "
            f"`{' '.join(['--prefill-policy', '<policy>', *args.proxy_arg])}`, defaults "
            "otherwise; "
            f"vllm-router: {' '.join((*VLLM_ROUTER_ARGS, *args.router_arg))}."
        ),
        "workload_facts": facts,
        "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
    }


def run(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], list[RouterResult]]:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    conversations, facts = workload(args)
    skipped: list[str] = []
    warnings: list[str] = []
    wanted = "vllm-router" in args.router_list
    located = vllm_router.find(args, wanted, "not requested (--routers)")
    if wanted and located.binary is None:
        skipped.append(f"vllm-router: {located.how}")
    print(
        f"{facts['requests']} requests per router, prompts of {facts['prompt_tokens_mean']} "
        "tokens on average",
        flush=True,
    )
    results: list[RouterResult] = []
    for name in args.router_list:
        if name == "vllm-router" and located.binary is None:
            continue
        router = "vllm-router" if name == "vllm-router" else "moriio-proxy"
        policy = "cache_aware" if name == "vllm-router" else name
        print(f"{router} {policy}: starting ...", flush=True)
        try:
            target = start(name, args, logs, located.binary)
        except StartError as exc:
            skipped.append(f"{name}: did not start: {exc}")
            print(f"!!! {name} did not start, SKIPPED:\n{exc}", flush=True)
            continue
        try:
            result = RouterResult(name, router, policy)
            run_router(target, result, conversations, args.users, args.answer_tokens)
        finally:
            target.stop()
        results.append(result)
        print(
            f"  {result.requests} requests in {result.seconds:.0f} s: hit rate "
            f"{100 * result.hit_rate:.1f}%, TTFT mean {result.ttft_mean_ms:.0f} ms p99 "
            f"{result.ttft_p99_ms:.0f} ms, legs per P {result.legs_per_p}, "
            f"errors {sum(result.errors.values())}",
            flush=True,
        )
        warnings += [f"{name}: {n}" for n in result.notes]
        if result.errors:
            warnings.append(f"{name}: failed or wrong answers: {result.errors}")
    report = {
        "run": describe_run(args, located, facts),
        "skipped": skipped,
        "warnings": warnings,
        "results": [r.to_json() for r in results],
        "targets_met": check_targets(results),
    }
    return report, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = runinfo.results_folder(args.out, "cache-")
    report, results = run(args, out)
    text = markdown(report, results)
    runinfo.write_results(out, "cache", report, text, args.update)
    return 0


if __name__ == "__main__":
    sys.exit(main())
