"""Latency of a playground request on the demo mixture: ``python -m bench.playground [--base smollm2|tiny]``.

Registers the bundled demo (datasets and the mixture ``mole-studio demo`` registers, through ``models`` and
``worker`` only: no ``app``) in a data dir, trains it with a short joint schedule through the real job path
(``worker.jobs.run_job``), or reuses it when that data dir holds it trained already (``--data-dir``), since latency
does not depend on quality. Then it times playground requests exactly as the playground makes them —
``load_trained`` (a cache hit after the first) then ``infer`` — of ``--new-tokens`` tokens (EOS ignored, so every
request generates all of them), with and without routing capture, paired and alternating on the same prompts (one
held-out row of each demo task). In the same rounds, the baselines: the same requests with the experts kept apart
while decoding (no folding of the prompt's fixed gates into the base weights); the frozen base alone (stored in the
same dtype) decoding as many tokens from the same prompt ids through the same greedy loop, and through
transformers' ``generate``. The machine's speed shows in the base alone.

Last line, machine-readable: ``p50_ms=<median ms of a request with routing capture> trace_overhead=<p50 with
capture / p50 without>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import sqlalchemy as sa
import torch

from migrations import upgrade_head
from models.bases import BUILTIN_SMOLLM2, BUILTIN_TINY, load_base
from models.data import ExampleRow, load_rows, prompt_ids, validate_upload
from models.decoding import greedy_decode
from models.demo import demo_files, tuned_demo_spec
from models.registry import LOCAL_OWNER, Dataset, Mixture, session_scope
from models.settings import Settings
from models.storage import ArtifactStore, new_key
from worker.dispatch import submit_training
from worker.inference import infer, load_trained
from worker.jobs import run_job

BASES = {"tiny": BUILTIN_TINY, "smollm2": BUILTIN_SMOLLM2}
ROOT = Path(__file__).resolve().parent.parent
TRAIN_LINES = 40  # rows per task registered for training (latency does not depend on quality)


def _default_bases_dir() -> Path:
    """The tests' shared cache of built bases, so SmolLM2's conversion and the tiny base's pre-training run once."""
    return Path(os.environ.get("BASE_CACHE_DIR") or ROOT / ".cache" / "test-bases")


def _register_datasets(settings: Settings, lines: int) -> list[Dataset]:
    """The first ``lines`` rows of each demo task as a dataset, stored like an upload (validated, generated key)."""
    store = ArtifactStore(settings.artifact_url)
    datasets = []
    for path in demo_files():
        data = b"".join(path.read_bytes().splitlines(keepends=True)[:lines])
        report = validate_upload(data, path.name, default_task=path.stem)
        if not report.ok:
            raise RuntimeError(f"the bundled demo file {path.name} does not validate: {report.summary()}")
        key = new_key("datasets", LOCAL_OWNER)
        digest = store.put_bytes(key, data)
        datasets.append(
            Dataset(
                name=f"{path.stem}-{uuid.uuid4().hex[:6]}",
                size_bytes=len(data),
                artifact_key=key,
                sha256=digest,
                **report.dataset_fields(),
            )
        )
    return datasets


def demo_mixture(settings: Settings, base: str, train_steps: int) -> uuid.UUID:
    """A trained ``demo-<base>-…`` mixture of this data dir: reused when there, else registered and trained."""
    name = f"demo-{base.removeprefix('builtin:')}"
    with session_scope(settings.db_url) as s:
        found = s.scalars(
            sa.select(Mixture).where(Mixture.name.startswith(f"{name}-"), Mixture.trained.is_(True))
        ).first()
        if found is not None:
            print(f"reusing the trained mixture {found.name} in {settings.studio_data_dir}")
            return found.id
    spec = tuned_demo_spec(base).model_dump(mode="json")  # what `mole-studio demo` registers
    spec["schedule"] |= {  # one joint stage: the demo's experts and router, trained just enough to be real
        "kind": "joint",
        "stage_steps": [train_steps],
        "batch_size": 4,
        "max_length": 128,
        "eval_every": 10_000,
        "checkpoint_every": 10_000,
    }
    with session_scope(settings.db_url) as s:
        mixture = Mixture(name=f"{name}-{uuid.uuid4().hex[:6]}", base_model=base, spec_json=spec)
        mixture.datasets.extend(_register_datasets(settings, TRAIN_LINES))
        s.add(mixture)
        s.flush()
        mixture_id = mixture.id
    started = time.monotonic()
    job_id = submit_training(settings, mixture_id, send=False)
    outcome = run_job(job_id, settings=settings)
    if outcome != "succeeded":
        raise RuntimeError(f"training the demo mixture ended with: {outcome}")
    print(f"trained {name} ({train_steps} steps) in {time.monotonic() - started:.1f} s")
    return mixture_id


def _prompts() -> list[tuple[str, str, str]]:
    """(instruction, input, task): the last row of each demo task, which the short training never saw."""
    prompts = []
    for path in demo_files():
        row = load_rows(path.read_bytes(), path.name, default_task=path.stem)[-1]
        prompts.append((row.instruction, row.input, row.task))
    return prompts


def _request(
    settings: Settings, mixture_id: uuid.UUID, prompt: tuple[str, str, str], tokens: int, trace: bool
) -> float:
    """One playground request as the playground makes it; returns its milliseconds."""
    instruction, input_text, task = prompt
    started = time.perf_counter()
    result = infer(
        load_trained(settings, mixture_id),
        instruction,
        input_text=input_text,
        task=task,
        max_new_tokens=tokens,
        trace=trace,
        stop_at_eos=False,
    )
    elapsed = (time.perf_counter() - started) * 1000
    assert len(result.generated_tokens) == tokens and (result.layer_weights is not None) == trace
    return elapsed


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class FrozenBase:
    """The mixture's base alone, as the playground stores it, decoding from the same prompt ids: the baseline."""

    def __init__(self, settings: Settings, mixture_id: uuid.UUID) -> None:
        loaded = load_trained(settings, mixture_id)
        self.tokenizer, self.task = loaded.tokenizer, loaded.spec.tasks[0]
        dtype = next(loaded.model.layers()).base.weight.dtype
        self.model, _ = load_base(loaded.spec.base_model, settings.bases_data_dir)
        self.model = self.model.to(dtype).eval()

    def _ids(self, prompt: tuple[str, str, str]) -> torch.Tensor:
        instruction, input_text, _ = prompt
        row = ExampleRow(task=self.task, instruction=instruction, input=input_text, output="-")
        return torch.tensor([prompt_ids(row, self.tokenizer)])

    def request(self, prompt: tuple[str, str, str], tokens: int) -> float:
        """The playground's greedy loop on the base alone."""
        ids = self._ids(prompt)
        started = time.perf_counter()
        eos = [self.tokenizer.eos_token_id]
        out = greedy_decode(self.model, ids, max_new_tokens=tokens, eos_token_ids=eos, stop_at_eos=False)
        elapsed = (time.perf_counter() - started) * 1000
        assert len(out.tokens) == tokens
        return elapsed

    @torch.inference_mode()
    def generate(self, prompt: tuple[str, str, str], tokens: int) -> float:
        """transformers' ``generate`` on the base alone: what a script would run."""
        ids = self._ids(prompt)
        started = time.perf_counter()
        eos = self.tokenizer.eos_token_id
        out = self.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=eos)
        elapsed = (time.perf_counter() - started) * 1000
        assert out.shape[1] == ids.shape[1] + tokens
        return elapsed


def _apart(settings: Settings, mixture_id: uuid.UUID, prompt: tuple[str, str, str], tokens: int) -> float:
    """A request with the experts kept apart while decoding (the fixed gates not folded into the base weights)."""
    state = load_trained(settings, mixture_id).model.state
    folding, state.fold_fixed_gates = state.fold_fixed_gates, False
    try:
        return _request(settings, mixture_id, prompt, tokens, True)
    finally:
        state.fold_fixed_gates = folding


def measure(settings: Settings, mixture_id: uuid.UUID, *, repeats: int, tokens: int, warmup: int) -> dict[str, float]:
    """Paired rounds: every prompt through every variant, the order rotating per round."""
    prompts, base = _prompts(), FrozenBase(settings, mixture_id)
    runs: dict[str, Callable[[tuple[str, str, str]], float]] = {
        "on": lambda p: _request(settings, mixture_id, p, tokens, True),
        "off": lambda p: _request(settings, mixture_id, p, tokens, False),
        "experts apart": lambda p: _apart(settings, mixture_id, p, tokens),
        "base alone": lambda p: base.request(p, tokens),
        "base, generate": lambda p: base.generate(p, tokens),
    }
    for prompt in prompts[:warmup]:
        for run in runs.values():
            run(prompt)
    times: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for round_ in range(repeats):
        for prompt in prompts:
            shift = round_ % len(labels)
            for label in labels[shift:] + labels[:shift]:
                times[label].append(runs[label](prompt))
    print(f"{'variant':<16} {'p50 ms':>8} {'p90 ms':>8} {'min ms':>8} {'requests':>9}")
    for label, values in times.items():
        print(
            f"{label:<16} {statistics.median(values):8.1f} {_percentile(values, 0.9):8.1f} {min(values):8.1f} "
            f"{len(values):9d}"
        )
    p50 = {label: statistics.median(values) for label, values in times.items()}
    print(
        f"mixture_vs_base={p50['on'] / p50['base alone']:.2f} folded_vs_apart={p50['on'] / p50['experts apart']:.2f} "
        f"loop_vs_generate={p50['base alone'] / p50['base, generate']:.2f} "
        f"(the base alone in {base.model.dtype}: p50 {p50['base alone']:.1f} ms)"
    )
    return {
        "p50_ms": p50["on"],
        "p50_plain_ms": p50["off"],
        "p50_base_ms": p50["base alone"],
        "trace_overhead": p50["on"] / p50["off"],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m bench.playground", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", choices=sorted(BASES), default="smollm2", help="base model (default smollm2)")
    parser.add_argument("--train-steps", type=int, default=6, help="training steps (default 6)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over the four prompts (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed prompts first (default 2)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep / reuse the trained mixture here")
    parser.add_argument("--bases-dir", type=Path, default=None, help="cache of built bases (default: the tests')")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.train_steps < 1:
        parser.error("--repeats and --train-steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mole-bench-playground-") as tmp:
        settings = Settings(
            studio_data_dir=args.data_dir or Path(tmp), base_cache_dir=args.bases_dir or _default_bases_dir()
        )
        upgrade_head(settings.db_url)
        mixture_id = demo_mixture(settings, BASES[args.base], args.train_steps)
        print(
            f"{args.base}: {args.new_tokens} new tokens per request, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        result = measure(settings, mixture_id, repeats=args.repeats, tokens=args.new_tokens, warmup=args.warmup)
    print(f"p50_ms={result['p50_ms']:.1f} trace_overhead={result['trace_overhead']:.2f}")
    return result


if __name__ == "__main__":
    main()
