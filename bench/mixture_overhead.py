"""Cost of the mixture layer against PEFT's LoRA of the same total rank and a per-expert Python loop.

Times forward + backward, interleaved round-robin in one run, of

    mixture  ``MixtureLinear``: E specific experts of rank r, learned ``softmax`` router (token), no universal expert
    peft     PEFT's own LoRA layer of rank E·r (the same total rank), built by ``peft.get_peft_model``
    loop     the same experts and router, one ``g_e · s_e · B_e(A_e x)`` per expert summed in Python (reference)
    base     the frozen linear alone

on one linear and on a small Llama (targets q/k/v/o), each in two round-robin rotations: {base, mixture, peft},
then {base, mixture, loop} (the loop's full-size temporaries would otherwise disturb the headline comparison).
The frozen matmul is the same in every variant, so the *adapter path* of a variant is its time minus the base's,
taken per round (paired) and then the median.
Ratios are only ever between numbers measured in this run; the last line is machine-readable:

    overhead_vs_single_lora=<mixture adapter / peft adapter> speedup_vs_loop=<loop adapter / mixture adapter>

Run: ``python -m bench.mixture_overhead [--repeats N] [--threads T] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.experts import MixtureLinear, RoutingState
from models.mixture import attach_mixture
from models.routers import ROUTER_KINDS, RoutingInputs
from models.spec import default_spec

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class Sizes:
    d: int = 1024  # d_in = d_out of the single linear
    batch: int = 4
    tokens: int = 256  # per row: batch · tokens = 1,024 tokens
    experts: int = 8
    rank: int = 8
    alpha: float = 16.0
    hidden: int = 512  # the small Llama
    layers: int = 4
    heads: int = 8
    intermediate: int = 1024
    vocab: int = 1000
    seq: int = 256
    llama_batch: int = 4


QUICK = Sizes(
    d=64, batch=2, tokens=16, hidden=64, layers=1, heads=4, intermediate=128, vocab=100, seq=16, llama_batch=2
)


# --- the variants ------------------------------------------------------------------------------------------------


def mixture_linear(base: nn.Linear, sizes: Sizes) -> MixtureLinear:
    """The studio's mixture layer: ``sizes.experts`` specific experts, softmax router per token, no universal."""
    options = ROUTER_KINDS["softmax"].Options(granularity="token")
    router = ROUTER_KINDS["softmax"](options, d_in=base.in_features, n_experts=sizes.experts, n_tasks=sizes.experts)
    return MixtureLinear(
        base,
        name="bench",
        state=RoutingState(),
        universal=[],
        specific=[(sizes.rank, sizes.alpha)] * sizes.experts,
        expert_names=[f"expert-{i}" for i in range(sizes.experts)],
        router=router,
    )


class LoopMixtureLinear(nn.Module):
    """The naive mixture: the same router, then ``Σ_e g_e · s_e · B_e (A_e x)`` one expert at a time.

    Written the way per-expert MoE-LoRA code usually is (each expert's full output weighted and summed); it takes
    copies of a ``MixtureLinear``'s frozen base, router and experts so its output equals that layer's.
    """

    def __init__(self, layer: MixtureLinear) -> None:
        super().__init__()
        assert layer.experts is not None and layer.router is not None and layer.n_universal == 0
        self.base = layer.base  # frozen, shared
        self.router = copy.deepcopy(layer.router)
        self.down = copy.deepcopy(layer.experts.down)
        self.up = copy.deepcopy(layer.experts.up)
        self.scales = [float(s) for s in layer.experts.scale]

    def forward(self, x: Tensor) -> Tensor:
        h = self.base(x)  # (B, T, d_out)
        gates = self.router(x, RoutingInputs()).weights  # (B, T|1, E)
        for e, (a, b, s) in enumerate(zip(self.down, self.up, self.scales, strict=True)):
            h = h + (gates[..., e : e + 1] * s) * ((x @ a.T) @ b.T)  # (B, T, d_out)
        return h


def _loop_model(mixture: nn.Module) -> nn.Module:
    """A copy of an attached mixture with every ``MixtureLinear`` replaced by its ``LoopMixtureLinear``."""
    looped = copy.deepcopy(mixture)
    for name, module in list(looped.named_modules()):
        if isinstance(module, MixtureLinear):
            parent, _, child = name.rpartition(".")
            setattr(looped.get_submodule(parent) if parent else looped, child, LoopMixtureLinear(module))
    return looped


def peft_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, config)


class OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _randomise_adapters(module: nn.Module, seed: int) -> None:
    """Non-zero B (and A, router) so the adapters do real work and the loop can be checked against the mixture."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# --- timing ------------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    step: Callable[[], None]  # one forward + backward (or forward only when nothing trains)
    params: list[nn.Parameter]

    def reset(self) -> None:
        for p in self.params:
            p.grad = None


def measure(
    variants: Sequence[Variant], *, repeats: int, warmup: int, max_seconds: float | None = None
) -> dict[str, list[float]]:
    """Seconds per step, ``repeats`` rounds; each round runs every variant once, the order rotated each round.

    With ``max_seconds``, rounds stop once that much time has passed since the first timed round (at least 3 run).
    """
    for _ in range(warmup):
        for v in variants:
            v.reset()
            v.step()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    gc.collect()
    gc.disable()
    started = time.perf_counter()
    try:
        for i in range(repeats):
            if max_seconds is not None and i >= 3 and time.perf_counter() - started > max_seconds:
                break
            shift = i % len(variants)
            for v in [*variants[shift:], *variants[:shift]]:
                v.reset()
                start = time.perf_counter()
                v.step()
                times[v.name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def adapter_times(times: dict[str, list[float]], base: str = "base") -> dict[str, float]:
    """Median over rounds of (variant − base) in the same round: the adapter path, frozen matmul removed."""
    return {
        name: statistics.median(t - b for t, b in zip(ts, times[base], strict=True))
        for name, ts in times.items()
        if name != base
    }


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` of two adapter-path times; NaN when either is not above timing noise (≤ 0)."""
    return numerator / denominator if numerator > 0 and denominator > 0 else float("nan")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f}"


def table(title: str, times: dict[str, list[float]], ref: str) -> tuple[dict[str, float], dict[str, float]]:
    """Print median whole / adapter-path times and ratios against ``ref``; return (whole, adapter) medians."""
    whole = {name: statistics.median(ts) for name, ts in times.items()}
    adapter = adapter_times(times)
    print(f"\n{title}")
    print(
        f"  {'variant':<10}{'whole ms':>10}{'p25':>9}{'p75':>9}{'adapter ms':>12}{'whole/' + ref:>15}"
        f"{'adapter/' + ref:>17}"
    )
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
        a = adapter.get(name)
        a_col = f"{a * 1e3:12.2f}" if a is not None else f"{'—':>12}"
        w_ratio = f"{whole[name] / whole[ref]:15.3f}"
        a_ratio = f"{ratio(a, adapter[ref]):17.3f}" if a is not None else f"{'—':>17}"
        print(f"  {name:<10}{_ms(whole[name])} {_ms(q[0])[1:]} {_ms(q[2])[1:]}{a_col}{w_ratio}{a_ratio}")
    return whole, adapter


@dataclass
class Rotations:
    """Two round-robin rotations of one model: mixture vs PEFT, then mixture vs the loop.

    Apart because in local trials the loop (many full-size temporaries) in the same rotation raised the measured
    mixture/PEFT ratio by several per cent, biasing the headline figure; each rotation has its own base.
    """

    vs_peft: dict[str, list[float]]
    vs_loop: dict[str, list[float]] | None


# --- the two benchmarks -----------------------------------------------------------------------------------------


def bench_linear(
    sizes: Sizes, *, repeats: int, warmup: int, input_grad: bool, max_seconds: float | None = None
) -> Rotations:
    torch.manual_seed(0)
    base = nn.Linear(sizes.d, sizes.d, bias=False).requires_grad_(False)
    mixture = mixture_linear(base, sizes)
    _randomise_adapters(mixture, seed=1)
    peft = peft_lora(OneLinear(copy.deepcopy(base)), ["proj"], sizes.experts * sizes.rank, sizes.alpha * sizes.experts)
    _randomise_adapters(peft, seed=2)

    x = torch.randn(sizes.batch, sizes.tokens, sizes.d, requires_grad=input_grad)
    grad = torch.randn(sizes.batch, sizes.tokens, sizes.d)  # backward of sum(out · grad)
    frozen_params = [x] if input_grad else []

    def train_step(module: nn.Module) -> Callable[[], None]:
        def step() -> None:
            module(x).backward(grad)

        return step

    def base_step() -> None:
        out = base(x)
        if input_grad:  # the frozen matmul's own backward (dx) is then part of every variant
            out.backward(grad)

    base_variant = Variant("base", base_step, frozen_params)
    mixture_variant = Variant("mixture", train_step(mixture), _trainable(mixture) + frozen_params)
    peft_variant = Variant("peft", train_step(peft), _trainable(peft) + frozen_params)
    vs_peft = measure(
        [base_variant, mixture_variant, peft_variant], repeats=repeats, warmup=warmup, max_seconds=max_seconds
    )

    loop = LoopMixtureLinear(mixture)
    with torch.no_grad():
        torch.testing.assert_close(loop(x), mixture(x), atol=1e-4, rtol=1e-4)
    loop_variant = Variant("loop", train_step(loop), _trainable(loop) + frozen_params)
    vs_loop = measure(
        [base_variant, mixture_variant, loop_variant], repeats=repeats, warmup=warmup, max_seconds=max_seconds
    )
    return Rotations(vs_peft, vs_loop)


def tiny_llama(sizes: Sizes) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        max_position_embeddings=max(512, sizes.seq),
    )
    model = LlamaForCausalLM(config).eval()  # eval: no dropout; autograd still on
    return model.requires_grad_(False)


def _embeddings_require_grad(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
    return output.requires_grad_(True)


def bench_llama(
    sizes: Sizes, *, repeats: int, warmup: int, with_loop: bool, max_seconds: float | None = None
) -> Rotations:
    base = tiny_llama(sizes)
    # Every variant (copies included) backpropagates down to the input embeddings, so the frozen network's own
    # backward is the same in all of them and "variant − base" is the adapters' work alone.
    base.get_input_embeddings().register_forward_hook(_embeddings_require_grad)
    tasks = [f"task{i}" for i in range(sizes.experts)]
    spec = default_spec(
        "bench-llama",
        tasks,
        router="softmax",
        universal={"count": 0},
        target_modules=TARGETS,
        experts=[
            {"name": f"expert-{i}", "tasks": [t], "rank": sizes.rank, "alpha": sizes.alpha}
            for i, t in enumerate(tasks)
        ],
    )
    mixture = attach_mixture(copy.deepcopy(base), spec)
    _randomise_adapters(mixture, seed=1)
    peft = peft_lora(copy.deepcopy(base), TARGETS, sizes.experts * sizes.rank, sizes.alpha * sizes.experts)
    _randomise_adapters(peft, seed=2)

    ids = torch.randint(0, sizes.vocab, (sizes.llama_batch, sizes.seq), generator=torch.Generator().manual_seed(3))

    def loss_of(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())

    def train_step(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            loss_of(model(input_ids=ids).logits).backward()

        return step

    base_variant = Variant("base", train_step(base), [])
    mixture_variant = Variant("mixture", train_step(mixture), _trainable(mixture))
    peft_variant = Variant("peft", train_step(peft), _trainable(peft))
    vs_peft = measure(
        [base_variant, mixture_variant, peft_variant], repeats=repeats, warmup=warmup, max_seconds=max_seconds
    )
    if not with_loop:
        return Rotations(vs_peft, None)
    loop = _loop_model(mixture)
    with torch.no_grad():
        torch.testing.assert_close(loop(input_ids=ids).logits, mixture(input_ids=ids).logits, atol=1e-3, rtol=1e-3)
    loop_variant = Variant("loop", train_step(loop), _trainable(loop))
    vs_loop = measure(
        [base_variant, mixture_variant, loop_variant], repeats=repeats, warmup=warmup, max_seconds=max_seconds
    )
    return Rotations(vs_peft, vs_loop)


# --- entry point -------------------------------------------------------------------------------------------------


def _busy_cpus(seconds: float = 0.5) -> float | None:
    """CPUs kept busy by anything over the next ``seconds`` (from /proc/stat); None where there is no /proc."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cpus = os.cpu_count() or 1
    return cpus * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m bench.mixture_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=60, help="timed rounds on the single linear (default 60)")
    parser.add_argument("--llama-repeats", type=int, default=None, help="timed rounds on the Llama (default 10)")
    parser.add_argument(
        "--max-seconds", type=float, default=40.0, help="stop a rotation's rounds after this long (default 40)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first on the linear (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--no-llama", action="store_true", help="only the single linear")
    parser.add_argument("--no-llama-loop", action="store_true", help="skip the naive loop on the Llama")
    parser.add_argument("--input-grad", action="store_true", help="single linear: x requires grad (mid-network)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    warmup = min(args.warmup, 1) if args.quick else args.warmup
    llama_repeats = args.llama_repeats or min(args.repeats, 10)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, via peft

    rank = sizes.experts * sizes.rank
    threads = torch.get_num_threads()
    busy = None if args.quick else _busy_cpus()
    busy_note = f", {busy:.1f} CPUs busy before the start" if busy is not None else ""
    print(f"torch {torch.__version__}, {threads} threads on {os.cpu_count()} CPUs{busy_note}")
    if busy is not None and busy + threads > (os.cpu_count() or 1) + 0.5:
        print(
            "note: other processes hold the cores, so timings are slowed and ratios less stable"
            + (
                "; with several threads every multi-threaded op waits for a descheduled one, which penalises"
                " many small ops (compare with --threads 1)"
                if threads > 1
                else ""
            )
        )
    print(
        f"rounds: up to {args.repeats} (linear) / {llama_repeats} (Llama) per rotation, each capped at"
        f" {args.max_seconds:g} s; a round runs each variant once, order rotated; {warmup} warmup round(s); medians"
    )
    print(f"E={sizes.experts} experts x r={sizes.rank} (softmax router, token, no universal) vs PEFT LoRA r={rank}")

    linear = bench_linear(
        sizes, repeats=args.repeats, warmup=warmup, input_grad=args.input_grad, max_seconds=args.max_seconds
    )
    tokens = sizes.batch * sizes.tokens
    where = f"single linear {sizes.d}x{sizes.d}, {tokens} tokens ({sizes.batch}x{sizes.tokens}), fwd+bwd"
    base_note = "x requires grad" if args.input_grad else "'base' = the frozen linear, forward only"
    whole, adapter = table(f"{where}, {len(linear.vs_peft['base'])} rounds ({base_note})", linear.vs_peft, "peft")
    assert linear.vs_loop is not None
    _, loop_adapter = table(
        f"  same, against the loop, {len(linear.vs_loop['base'])} rounds", linear.vs_loop, "mixture"
    )
    rounds = zip(linear.vs_peft["mixture"], linear.vs_peft["peft"], linear.vs_peft["base"], strict=True)
    per_round = [(m - b) / (p - b) for m, p, b in rounds if p > b] or [float("nan")]
    spread = statistics.quantiles(per_round, n=4, method="inclusive") if len(per_round) > 1 else [per_round[0]] * 3
    # matmul FLOPs, adapter path: LoRA 5 (6 with dx) of 2·N·d·R; router 2 (3 with dx) of 2·N·d·E
    floor = 1 + (3 if args.input_grad else 2) * sizes.experts / ((6 if args.input_grad else 5) * rank)
    result = {
        "overhead_vs_single_lora": ratio(adapter["mixture"], adapter["peft"]),
        "speedup_vs_loop": ratio(loop_adapter["loop"], loop_adapter["mixture"]),
        "whole_layer_vs_peft": whole["mixture"] / whole["peft"],
    }
    print(
        f"  adapter path mixture/peft {result['overhead_vs_single_lora']:.3f} (per-round quartiles "
        f"{spread[0]:.3f}..{spread[2]:.3f}; target <= 1.2, matmul FLOP floor {floor:.3f})"
    )
    print(f"  adapter path loop/mixture {result['speedup_vs_loop']:.2f} (target >= 3)")
    print(f"  whole layer  mixture/peft {result['whole_layer_vs_peft']:.3f} (target <= 1.05)")

    if not args.no_llama:
        llama = bench_llama(
            sizes,
            repeats=llama_repeats,
            warmup=min(warmup, 1),
            with_loop=not args.no_llama_loop,
            max_seconds=args.max_seconds,
        )
        title = (
            f"Llama hidden {sizes.hidden}, {sizes.layers} layers, {sizes.heads} heads, intermediate "
            f"{sizes.intermediate}, vocab {sizes.vocab}; batch {sizes.llama_batch} x seq {sizes.seq}; "
            f"targets {','.join(TARGETS)}; fwd+bwd, {len(llama.vs_peft['base'])} rounds\n"
            "  (every variant backpropagates to the input embeddings; 'base' = the frozen model alone)"
        )
        llama_whole, llama_adapter = table(title, llama.vs_peft, "peft")
        result["llama_whole_vs_peft"] = llama_whole["mixture"] / llama_whole["peft"]
        result["llama_adapter_vs_peft"] = ratio(llama_adapter["mixture"], llama_adapter["peft"])
        if llama.vs_loop is not None:
            n = len(llama.vs_loop["base"])
            _, llama_loop = table(f"  same, against the loop, {n} rounds", llama.vs_loop, "mixture")
            result["llama_speedup_vs_loop"] = ratio(llama_loop["loop"], llama_loop["mixture"])
        print(
            f"  whole model  mixture/peft {result['llama_whole_vs_peft']:.3f}; "
            f"adapter path mixture/peft {result['llama_adapter_vs_peft']:.3f}"
            + (f"; loop/mixture {result['llama_speedup_vs_loop']:.2f}" if "llama_speedup_vs_loop" in result else "")
        )

    if any(math.isnan(value) for value in result.values()):
        print("note: nan = an adapter path not above timing noise (too few rounds or sizes too small)")
    print(
        f"overhead_vs_single_lora={result['overhead_vs_single_lora']:.2f} "
        f"speedup_vs_loop={result['speedup_vs_loop']:.2f}"
    )
    return result


if __name__ == "__main__":
    main()
