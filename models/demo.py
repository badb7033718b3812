"""The bundled demo: four small generated tasks with different skills, and a mixture ready to train on them.

- ``dates``   string transform: ISO date -> DD/MM/YYYY
- ``emails``  extraction: the domain of the one e-mail address in a sentence
- ``questions`` classification: is the sentence a question or a statement
- ``times``   conversion: a 12-hour clock time -> 24-hour ("7:05 pm" -> "19:05", "12:30 am" -> "00:30")

The JSONL files in ``models/demo_data/`` are what ``mole-studio demo`` registers; ``write_demo_files`` makes them
again from a fixed seed (a test checks they match), so they are reproducible and reviewable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.bases import BUILTIN_SMOLLM2, BUILTIN_TINY
from models.data import ExampleRow, load_rows
from models.spec import MixtureSpec, default_spec

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
DEMO_TASKS = ("dates", "emails", "questions", "times")
ROWS_PER_TASK = 400
SEED = 1234
_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
_DOMAINS = ["example.org", "mail.com", "studio.ai", "uni.edu", "shop.net", "lab.io", "news.co", "home.dev"]
_VERBS = ["Write to", "Contact", "Please email", "Send it to", "Reach out to", "Ask"]


def _date(rng: random.Random) -> ExampleRow:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return ExampleRow(
        task="dates",
        instruction="Rewrite the date as DD/MM/YYYY.",
        input=f"{year:04d}-{month:02d}-{day:02d}",
        output=f"{day:02d}/{month:02d}/{year:04d}",
    )


def _email(rng: random.Random) -> ExampleRow:
    address = f"{rng.choice(_NAMES)}{rng.randint(1, 99)}@{rng.choice(_DOMAINS)}"
    return ExampleRow(
        task="emails",
        instruction="Give the domain of the e-mail address.",
        input=f"{rng.choice(_VERBS)} {address}.",
        output=address.split("@")[1],
    )


_SUBJECTS = [
    "the cat", "my sister", "our team", "the old train", "your friend", "the bakery", "this laptop", "the river",
    "a student", "the museum", "the printer", "her garden", "the new cafe", "his uncle", "the night bus",
    "the library", "my neighbour", "the orchestra", "that shop", "the ferry",
]  # fmt: skip
_PREDICATES = [  # (base form, third person)
    ("open at nine", "opens at nine"), ("sleep all day", "sleeps all day"), ("win the match", "wins the match"),
    ("stay very quiet", "stays very quiet"), ("need a new battery", "needs a new battery"),
    ("look beautiful", "looks beautiful"), ("arrive late", "arrives late"), ("sell fresh bread", "sells fresh bread"),
    ("close on Sundays", "closes on Sundays"), ("play loud music", "plays loud music"),
    ("run every morning", "runs every morning"), ("smell of coffee", "smells of coffee"),
    ("work from home", "works from home"), ("fill up quickly", "fills up quickly"),
    ("take the long road", "takes the long road"), ("ring twice", "rings twice"),
]  # fmt: skip
_QUESTION_HEADS = ["Does", "Why does", "When does", "Where does", "How often does"]


def _question(rng: random.Random) -> ExampleRow:
    subject, (base, third) = rng.choice(_SUBJECTS), rng.choice(_PREDICATES)
    if rng.random() < 0.5:
        sentence, label = f"{rng.choice(_QUESTION_HEADS)} {subject} {base}?", "question"
    else:
        sentence, label = f"{subject[0].upper()}{subject[1:]} {third}.", "statement"
    return ExampleRow(
        task="questions",
        instruction="Is it a question or a statement?",
        input=sentence,
        output=label,
    )


def _time(rng: random.Random) -> ExampleRow:
    hour, minute, pm = rng.randint(1, 12), rng.randint(0, 59), rng.random() < 0.5
    return ExampleRow(
        task="times",
        instruction="Write the time in 24-hour format.",
        input=f"{hour}:{minute:02d} {'pm' if pm else 'am'}",
        output=f"{hour % 12 + 12 * pm:02d}:{minute:02d}",
    )


GENERATORS: dict[str, Callable[[random.Random], ExampleRow]] = {
    "dates": _date,
    "emails": _email,
    "questions": _question,
    "times": _time,
}


def generate(task: str, n: int = ROWS_PER_TASK, seed: int = SEED) -> list[ExampleRow]:
    """``n`` distinct rows of ``task`` from a fixed seed."""
    rng = random.Random(f"{seed}-{task}")
    rows: dict[tuple[str, str], ExampleRow] = {}
    while len(rows) < n:
        row = GENERATORS[task](rng)
        rows.setdefault((row.input, row.output), row)
    return list(rows.values())


def write_demo_files(folder: Path = DEMO_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in DEMO_TASKS:
        path = folder / f"{task}.jsonl"
        lines = [
            json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output}) for r in generate(task)
        ]
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def demo_files() -> list[Path]:
    return [DEMO_DIR / f"{task}.jsonl" for task in DEMO_TASKS]


def demo_rows(per_task: int | None = None) -> list[ExampleRow]:
    """The shipped demo rows (validated like any upload), optionally the first ``per_task`` of each task."""
    rows = []
    for path in demo_files():
        task_rows = load_rows(path.read_bytes(), path.name, default_task=path.stem)
        rows += task_rows[:per_task] if per_task else task_rows
    return rows


def demo_spec(base_model: str, *, router: str = "modula", **changes: object) -> MixtureSpec:
    """Universal + one expert per demo task with a learned router, on the MoDULA schedule by default."""
    spec = default_spec(base_model, list(DEMO_TASKS), router=router)
    data = spec.model_dump() | {"schedule": {"kind": "modula", "stage_steps": [100, 100, 50]}}
    return MixtureSpec.model_validate(data | changes)


@dataclass(frozen=True)
class DemoRecipe:
    """How long and how hard the demo trains on one base: what ``bench.demo_learns`` measured (README)."""

    stage_steps: tuple[int, int, int]  # MoDULA: universal, domain experts, router
    batch_size: int
    learning_rate: float
    max_length: int
    eval_every: int  # held-out evaluation, which the achievement weights read
    router_learning_rate: float = 1e-2


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEMO_RECIPES = {
    BUILTIN_TINY: DemoRecipe((225, 750, 225), 16, 5e-3, 128, 100),
    BUILTIN_SMOLLM2: DemoRecipe((30, 60, 50), 8, 1e-3, 160, 40),
}


def tuned_demo_spec(base_model: str, *, router: str = "modula", recipe: DemoRecipe | None = None) -> MixtureSpec:
    """The demo mixture as measured: MoDULA-Res with sequence gates, C-LoRAE achievement weighting, attention + MLP
    projections, the base's recipe (SmolLM2's for any other base: a pre-trained model learns like it)."""
    recipe = recipe or DEMO_RECIPES.get(base_model, DEMO_RECIPES[BUILTIN_SMOLLM2])
    data = demo_spec(base_model, router=router).model_dump(mode="json")
    data["target_modules"] = ALL_PROJECTIONS
    data["loss"] = {"weighting": "achievement"}
    data["router"]["options"] |= {"granularity": "sequence"}
    data["schedule"] |= {
        "stage_steps": list(recipe.stage_steps),
        "batch_size": recipe.batch_size,
        "learning_rate": recipe.learning_rate,
        "router_learning_rate": recipe.router_learning_rate,
        "max_length": recipe.max_length,
        "eval_every": recipe.eval_every,
    }
    return MixtureSpec.model_validate(data)


if __name__ == "__main__":
    for written in write_demo_files():
        print(written)  # noqa: T201
