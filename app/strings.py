"""Every user-facing text of the studio in one place."""

TITLE = "MoLE Studio"
SUBTITLE = "Compose, train and test mixtures of LoRA experts on Hugging Face models — without code."

TAB_DATASETS = "Datasets"
TAB_COMPOSE = "Compose"
TAB_JOBS = "Jobs"
TAB_EXPERTS = "Experts"
TAB_PLAYGROUND = "Playground"

DATASETS_INTRO = (
    "Upload task datasets (JSONL, CSV or Parquet) with instruction / input / output or chat rows, "
    "one task per file or a `task` column. Files are validated before anything is stored."
)
COMPOSE_INTRO = (
    "Pick a base model, universal and task-specific LoRA experts, a router and a training schedule. "
    "The mixture is drawn as you edit it."
)
JOBS_INTRO = "Training jobs run on Celery workers. Watch progress and per-task loss curves, cancel or retry."
EXPERTS_INTRO = (
    "Every trained expert with its lineage and metrics; reuse it in a mixture or export it as a PEFT adapter."
)
PLAYGROUND_INTRO = "Type a prompt and see the output with the routing weights per layer and per token."
REFRESH = "Refresh"
