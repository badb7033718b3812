"""Compose tab: the no-code mixture composer.

A form (base, datasets, target layers, universal and task experts, router, loss weighting, schedule) that is drawn as
a diagram with its trainable-parameter count on every change, and the actions on saved mixtures: save, open,
duplicate, add a task to a trained mixture, start training. The form's values travel as keyword arguments named
after ``services.ComposeForm``'s fields, so ``gradio_client`` callers may pass only the values they change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from app import strings
from app.context import ServiceError, StudioContext
from app.services import mixtures as services
from models.bases import BUILTIN_TINY
from models.routers import ROUTER_KINDS
from models.spec import MixtureSpec

Component = gr.components.Component
ACHIEVEMENT_FIELDS = ("gamma", "epsilon", "targets")


@dataclass
class TabHandles:
    """Components other tabs may use.

    * "Use in a new mixture" (Experts tab): chain ``.success(lambda spec: prefill_from_spec(spec, ctx),
      inputs=<spec JSON>, outputs=handles.prefill_outputs)`` and select this tab.
    * "Start training" → Jobs tab: chain ``handles.start_event.success(...)`` with ``inputs=handles.job_id`` (the
      new job's id, full uuid) and select the Jobs tab.
    """

    table: gr.Dataframe  # saved mixtures
    refresh: gr.Button
    mixture: gr.Dropdown  # the saved mixture that open / duplicate / add a task / start training act on
    datasets: gr.Dropdown
    form: dict[str, Component]  # services.FORM_FIELDS -> component, in that order
    spec: gr.JSON
    job_id: gr.Textbox
    start_event: Any  # the "start training" event (a gradio Dependency), for ``.success`` chaining
    prefill_outputs: list[Component]  # what ``prefill_from_spec`` returns values for, in order


@dataclass
class _View:
    message: gr.Markdown
    diagram: gr.HTML
    spec: gr.JSON


@dataclass
class _Actions:
    name: gr.Textbox
    parent: gr.Textbox
    save: gr.Button
    mixture: gr.Dropdown
    open: gr.Button
    new_name: gr.Textbox
    duplicate: gr.Button
    add_dataset: gr.Dropdown
    child_name: gr.Textbox
    add_task: gr.Button
    train: gr.Button
    job_id: gr.Textbox
    status: gr.Markdown


def build(ctx: StudioContext) -> TabHandles:
    """Lay out the tab inside the current ``gr.Tab`` and wire its events."""
    gr.Markdown(strings.COMPOSE_INTRO)
    initial = services.ComposeForm()
    with gr.Row():
        with gr.Column(scale=4):
            form, datasets = _base_section(ctx, initial)
            form |= _experts_section(initial)
            form |= _router_section(initial)
            form |= _loss_section(initial)
            form |= _schedule_section(initial)
        with gr.Column(scale=6):
            view = _view_section()
    form = {name: form[name] for name in services.FORM_FIELDS}
    actions = _actions_section()
    table = gr.Dataframe(
        value=lambda: services.list_mixtures(ctx=ctx),
        label="Saved mixtures",
        interactive=False,
        elem_id="compose-table",
    )
    refresh = gr.Button(strings.REFRESH, elem_id="compose-refresh")
    refresh.click(lambda: services.list_mixtures(ctx=ctx), outputs=table, api_name="list_mixtures")
    _wire_form(ctx, form, datasets, view)
    _wire_save(ctx, form, datasets, view, actions, table)
    prefill_outputs = [*form.values(), datasets, actions.parent, actions.status]
    start_event = _wire_mixtures(ctx, actions, table, prefill_outputs)
    return TabHandles(
        table, refresh, actions.mixture, datasets, form, view.spec, actions.job_id, start_event, prefill_outputs
    )


# --------------------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------------------


def _initial_targets(ctx: StudioContext, initial: services.ComposeForm) -> list[str]:
    """Choices before the page loads the chosen base's own: the tiny base's (Llama) layers, read from its config."""
    try:
        return services.inspect_base(ctx=ctx, base_model=BUILTIN_TINY).linear_modules
    except ServiceError:
        return list(initial.target_modules or [])


def _base_section(ctx: StudioContext, initial: services.ComposeForm) -> tuple[dict[str, Component], gr.Dropdown]:
    base = gr.Dropdown(
        label=strings.COMPOSE_BASE,
        choices=services.base_choices(ctx=ctx),
        value=initial.base_model,
        allow_custom_value=True,
        elem_id="compose-base",
    )
    with gr.Row():
        datasets = gr.Dropdown(
            label=strings.COMPOSE_DATASETS,
            choices=[],
            value=[],
            multiselect=True,
            allow_custom_value=True,
            elem_id="compose-datasets",
            scale=3,
        )
        tasks = gr.Textbox(label=strings.COMPOSE_TASKS, value="", interactive=False, elem_id="compose-tasks", scale=2)
    targets = gr.CheckboxGroup(
        label=strings.COMPOSE_TARGETS,
        choices=_initial_targets(ctx, initial),
        value=initial.target_modules,
        elem_id="compose-targets",
    )
    return {"base_model": base, "tasks": tasks, "target_modules": targets}, datasets


def _experts_section(initial: services.ComposeForm) -> dict[str, Component]:
    with gr.Group():
        gr.Markdown(f"**{strings.COMPOSE_UNIVERSAL}**")
        with gr.Row():
            count = gr.Number(initial.universal_count, label=strings.COMPOSE_UNIVERSAL_COUNT, precision=0)
            rank = gr.Number(initial.universal_rank, label=strings.COMPOSE_RANK, precision=0)
            alpha = gr.Number(initial.universal_alpha, label=strings.COMPOSE_ALPHA)
            dropout = gr.Number(initial.lora_dropout, label=strings.COMPOSE_DROPOUT, step=0.05)
        with gr.Row():
            embeddings = gr.Checkbox(initial.train_embeddings, label=strings.COMPOSE_EMBEDDINGS)
            head = gr.Checkbox(initial.train_head, label=strings.COMPOSE_HEAD)
    experts = gr.Dataframe(
        value=services.expert_rows([]),
        headers=services.EXPERT_COLUMNS,
        datatype=["str", "str", "number", "number", "str"],
        label=strings.COMPOSE_EXPERTS,
        interactive=True,
        elem_id="compose-experts",
    )
    return {
        "universal_count": count,
        "universal_rank": rank,
        "universal_alpha": alpha,
        "train_embeddings": embeddings,
        "train_head": head,
        "lora_dropout": dropout,
        "experts": experts,
    }


def _router_section(initial: services.ComposeForm) -> dict[str, Component]:
    with gr.Accordion(strings.COMPOSE_ROUTER, open=True):
        kind = gr.Dropdown(
            label=strings.COMPOSE_ROUTER_KIND,
            choices=list(ROUTER_KINDS),
            value=initial.router_kind,
            allow_custom_value=True,  # an unknown kind gets the spec's message, with the kinds there are
            elem_id="compose-router",
        )
        options = gr.Dataframe(
            value=services.router_option_rows(initial.router_kind),
            headers=services.OPTION_COLUMNS,
            datatype="str",
            static_columns=[0, 2],
            label=strings.COMPOSE_ROUTER_OPTIONS,
            interactive=True,
            elem_id="compose-router-options",
        )
    return {"router_kind": kind, "router_options": options}


def _loss_section(initial: services.ComposeForm) -> dict[str, Component]:
    with gr.Accordion(strings.COMPOSE_LOSS, open=False), gr.Row():
        weighting = gr.Dropdown(
            label=strings.COMPOSE_WEIGHTING,
            choices=services.WEIGHTINGS,
            value=initial.weighting,
            allow_custom_value=True,
            elem_id="compose-weighting",
        )
        visible = _loss_visibility(initial.weighting)
        temperature = gr.Number(initial.temperature, label=strings.COMPOSE_TEMPERATURE, visible=visible[0])
        gamma = gr.Number(initial.gamma, label=strings.COMPOSE_GAMMA, visible=visible[1])
        epsilon = gr.Number(initial.epsilon, label=strings.COMPOSE_EPSILON, visible=visible[2])
        targets = gr.Textbox(initial.targets, label=strings.COMPOSE_TARGETS_PER_TASK, visible=visible[3])
    return {"weighting": weighting, "temperature": temperature, "gamma": gamma, "epsilon": epsilon, "targets": targets}


def _loss_visibility(weighting: str | None) -> tuple[bool, bool, bool, bool]:
    """Only the chosen weighting's own parameters are shown (temperature; or γ, ε and the potentials)."""
    achievement = weighting == "achievement"
    return weighting == "temperature", achievement, achievement, achievement


def _schedule_section(initial: services.ComposeForm) -> dict[str, Component]:
    f = initial
    with gr.Accordion(strings.COMPOSE_SCHEDULE, open=True):
        with gr.Row():
            kind = gr.Dropdown(
                label=strings.COMPOSE_SCHEDULE_KIND,
                choices=services.SCHEDULE_KINDS,
                value=f.schedule_kind,
                allow_custom_value=True,
                elem_id="compose-schedule",
            )
            steps = gr.Textbox(f.stage_steps, label=strings.COMPOSE_STAGE_STEPS, elem_id="compose-stage-steps")
        with gr.Row():
            batch = gr.Number(f.batch_size, label=strings.COMPOSE_BATCH, precision=0)
            accum = gr.Number(f.grad_accum, label=strings.COMPOSE_GRAD_ACCUM, precision=0)
            lr = gr.Number(f.learning_rate, label=strings.COMPOSE_LR)
            router_lr = gr.Number(f.router_learning_rate, label=strings.COMPOSE_ROUTER_LR)
        with gr.Row():
            warmup = gr.Number(f.warmup_steps, label=strings.COMPOSE_WARMUP, precision=0)
            length = gr.Number(f.max_length, label=strings.COMPOSE_MAX_LENGTH, precision=0)
            seed = gr.Number(f.seed, label=strings.COMPOSE_SEED, precision=0)
            every = gr.Number(f.eval_every, label=strings.COMPOSE_EVAL_EVERY, precision=0)
            ckpt = gr.Number(f.checkpoint_every, label=strings.COMPOSE_CHECKPOINT_EVERY, precision=0)
    return {
        "schedule_kind": kind,
        "stage_steps": steps,
        "batch_size": batch,
        "grad_accum": accum,
        "learning_rate": lr,
        "router_learning_rate": router_lr,
        "warmup_steps": warmup,
        "max_length": length,
        "seed": seed,
        "eval_every": every,
        "checkpoint_every": ckpt,
    }


def _view_section() -> _View:
    message = gr.Markdown(elem_id="compose-message")
    diagram = gr.HTML(label=strings.COMPOSE_DIAGRAM, js_on_load=None, elem_id="compose-diagram")
    with gr.Accordion(strings.COMPOSE_SPEC, open=False):
        spec = gr.JSON(label=strings.COMPOSE_SPEC, elem_id="compose-spec")
    return _View(message, diagram, spec)


def _actions_section() -> _Actions:
    with gr.Row(equal_height=True):
        name = gr.Textbox(
            "", label=strings.COMPOSE_NAME, placeholder=strings.COMPOSE_NAME_HINT, elem_id="compose-name"
        )
        parent = gr.Textbox("", label=strings.COMPOSE_PARENT, interactive=False, elem_id="compose-parent")
        save = gr.Button(strings.COMPOSE_SAVE, variant="primary", elem_id="compose-save")
    with gr.Row(equal_height=True):
        mixture = gr.Dropdown(
            label=strings.COMPOSE_MIXTURE, choices=[], value=None, allow_custom_value=True, elem_id="compose-mixture"
        )
        open_ = gr.Button(strings.COMPOSE_OPEN, elem_id="compose-open")
        new_name = gr.Textbox("", label=strings.COMPOSE_NEW_NAME, elem_id="compose-new-name")
        duplicate = gr.Button(strings.COMPOSE_DUPLICATE, elem_id="compose-duplicate")
    gr.Markdown(strings.COMPOSE_ADD_TASK_HELP)
    with gr.Row(equal_height=True):
        add_dataset = gr.Dropdown(
            label=strings.COMPOSE_ADD_DATASET,
            choices=[],
            value=None,
            allow_custom_value=True,
            elem_id="compose-add-dataset",
        )
        child_name = gr.Textbox("", label=strings.COMPOSE_CHILD_NAME, elem_id="compose-child-name")
        add_task = gr.Button(strings.COMPOSE_ADD_TASK, elem_id="compose-add-task")
    with gr.Row(equal_height=True):
        train = gr.Button(strings.COMPOSE_TRAIN, variant="primary", elem_id="compose-train")
        job_id = gr.Textbox(label=strings.COMPOSE_JOB, interactive=False, elem_id="compose-job")
    status = gr.Markdown(elem_id="compose-status")
    return _Actions(
        name,
        parent,
        save,
        mixture,
        open_,
        new_name,
        duplicate,
        add_dataset,
        child_name,
        add_task,
        train,
        job_id,
        status,
    )


# --------------------------------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------------------------------


def _call(fn: Any, **kwargs: Any) -> Any:
    """Run one service function; its refusal becomes a ``gr.Error`` (shown on the page and returned to the API)."""
    try:
        return fn(**kwargs)
    except ServiceError as error:
        raise gr.Error(str(error)) from error


def _or_skip(value: Any) -> Any:
    """``None`` from a service means "leave it as it is"."""
    return gr.skip() if value is None else value


def _form(values: dict[str, Any]) -> services.ComposeForm:
    return services.ComposeForm(**{name: values[name] for name in services.FORM_FIELDS})


def _wire_form(ctx: StudioContext, form: dict[str, Component], datasets: gr.Dropdown, view: _View) -> None:
    """The base's layers, defaults that follow a choice, and the drawing redrawn on every change (and on load)."""
    _wire_base(ctx, form)
    _wire_defaults(ctx, form, datasets)

    def preview(**values: Any) -> tuple[str, Any, str]:
        shown = services.preview_mixture(ctx=ctx, form=_form(values))
        spec = shown.spec.model_dump(mode="json") if shown.spec else None
        return shown.svg, spec, "  \n".join(f"⚠️ {line}" for line in shown.message.splitlines())

    gr.on(
        None,  # on page load and on every change of the form
        preview,
        inputs_kwargs=form,
        outputs=[view.diagram, view.spec, view.message],
        trigger_mode="always_last",
        show_progress="hidden",
        api_visibility="private",
    )


def _wire_base(ctx: StudioContext, form: dict[str, Component]) -> None:
    """The target checkboxes offer the chosen base's own linear layers; an unknown base is refused with a message."""
    initial = services.ComposeForm()

    def inspect_base(base_model: str | None, target_modules: list[str] | None) -> Any:
        names, ticked = _call(services.target_choices, ctx=ctx, base_model=base_model, current=target_modules)
        return gr.CheckboxGroup(choices=names, value=ticked)

    def initial_layers() -> Any:
        """On page load: the default base's own layers (unchanged if it cannot be read; the page says why)."""
        try:
            names, ticked = services.target_choices(
                ctx=ctx, base_model=initial.base_model, current=initial.target_modules
            )
        except ServiceError:
            return gr.skip()
        return gr.CheckboxGroup(choices=names, value=ticked)

    base, targets = form["base_model"], form["target_modules"]
    base.change(inspect_base, inputs=[base, targets], outputs=targets, api_name="inspect_base")
    gr.on(None, initial_layers, outputs=targets, api_visibility="private")  # no inputs: runs on page load only
    base.focus(lambda: gr.Dropdown(choices=services.base_choices(ctx=ctx)), outputs=base, api_visibility="private")


def _wire_defaults(ctx: StudioContext, form: dict[str, Component], datasets: gr.Dropdown) -> None:
    """A person's choice of datasets, router kind, schedule or weighting sets the values that go with it."""

    def choose_datasets(dataset_names: list[str] | None, tasks: str | None, experts: pd.DataFrame) -> tuple:
        shown, table = _call(
            services.choose_datasets, ctx=ctx, dataset_names=dataset_names, tasks=tasks, experts=experts
        )
        return _or_skip(shown), _or_skip(table)

    def choose_router(kind: str | None, options: pd.DataFrame, tasks: str | None, experts: pd.DataFrame) -> tuple:
        rows, table = services.router_defaults(kind=kind, options=options, tasks=tasks, experts=experts)
        return _or_skip(rows), _or_skip(table)

    datasets.focus(
        lambda: gr.Dropdown(choices=services.dataset_names(ctx=ctx)), outputs=datasets, api_visibility="private"
    )
    datasets.change(  # .change, not .input: typed values and programmatic ones count too; unchanged tasks are kept
        choose_datasets,
        inputs=[datasets, form["tasks"], form["experts"]],
        outputs=[form["tasks"], form["experts"]],
        api_name="choose_datasets",
    )
    form["router_kind"].change(
        choose_router,
        inputs=[form["router_kind"], form["router_options"], form["tasks"], form["experts"]],
        outputs=[form["router_options"], form["experts"]],
        api_visibility="private",
    )
    form["schedule_kind"].change(  # instant and pure: not queued behind a base inspection, so it lands before typing
        services.stage_steps_for,
        inputs=[form["schedule_kind"], form["stage_steps"]],
        outputs=form["stage_steps"],
        api_visibility="private",
        concurrency_limit=None,
    )
    form["weighting"].change(
        lambda w: [gr.update(visible=v) for v in _loss_visibility(w)],
        inputs=form["weighting"],
        outputs=[form[name] for name in ("temperature", *ACHIEVEMENT_FIELDS)],
        api_visibility="private",
    )


def _wire_save(
    ctx: StudioContext,
    form: dict[str, Component],
    datasets: gr.Dropdown,
    view: _View,
    actions: _Actions,
    table: gr.Dataframe,
) -> None:
    """Save = build the spec from the form (refused with the field's message), then store it under the name."""

    def build_spec(**values: Any) -> dict[str, Any]:
        return _call(services.build_spec, form=_form(values)).model_dump(mode="json")

    def save_mixture(name: str, spec_json: Any, dataset_names: list[str] | None, parent: str | None) -> tuple:
        mixture = _call(
            services.save_mixture,
            ctx=ctx,
            name=name,
            spec_json=spec_json or {},
            dataset_names=dataset_names or [],
            parent=parent or None,
            check_base=True,
        )
        trainable, _, _ = services.parameter_count(ctx=ctx, spec=MixtureSpec.model_validate(mixture.spec_json))
        done = strings.COMPOSE_SAVED.format(name=mixture.name, trainable=f"{trainable:,}")
        return done, _mixture_choice(ctx, mixture.name), services.list_mixtures(ctx=ctx)

    actions.save.click(build_spec, inputs_kwargs=form, outputs=view.spec, api_name="build_spec").success(
        save_mixture,
        inputs=[actions.name, view.spec, datasets, actions.parent],
        outputs=[actions.status, actions.mixture, table],
        api_name="save_mixture",
        show_progress="hidden",  # a refusal must not cover the mixture picker with an error overlay
    )


def _mixture_choice(ctx: StudioContext, name: str | None = None) -> Any:
    return gr.Dropdown(choices=services.mixture_names(ctx=ctx), value=name)


def _wire_mixtures(
    ctx: StudioContext, actions: _Actions, table: gr.Dataframe, prefill_outputs: list[Component]
) -> Any:
    """Open, duplicate, add a task, start training: each acts on the mixture chosen in ``actions.mixture``."""

    def open_mixture(name: str | None) -> list[Any]:
        opened = _call(services.open_mixture, ctx=ctx, name=name)
        state = strings.COMPOSE_TRAINED if opened.trained else strings.COMPOSE_NOT_TRAINED
        return [
            *form_values(opened.spec, ctx),
            gr.Dropdown(choices=services.dataset_names(ctx=ctx), value=opened.datasets, multiselect=True),
            opened.parent or "",
            strings.COMPOSE_OPENED.format(name=opened.name, state=state),
        ]

    def duplicate_mixture(name: str | None, new_name: str | None) -> tuple:
        copy = _call(services.duplicate_mixture, ctx=ctx, name=name, new_name=new_name)
        done = strings.COMPOSE_DUPLICATED.format(name=name, new=copy.name)
        return done, _mixture_choice(ctx, copy.name), services.list_mixtures(ctx=ctx)

    def add_task(name: str | None, dataset: str | None, new_name: str | None) -> tuple:
        child = _call(services.add_task, ctx=ctx, name=name, dataset=dataset, new_name=new_name or None)
        task = child.spec_json["tasks"][-1]
        done = strings.COMPOSE_ADDED.format(name=child.name, parent=name, task=task)
        return done, _mixture_choice(ctx, child.name), services.list_mixtures(ctx=ctx)

    def start_training(name: str | None) -> tuple[str, str]:
        job_id = _call(services.start_training, ctx=ctx, name=name)
        return str(job_id), strings.COMPOSE_STARTED.format(job=str(job_id)[:8], name=name)

    changed = [actions.status, actions.mixture, table]
    actions.mixture.focus(
        lambda: gr.Dropdown(choices=services.mixture_names(ctx=ctx)), outputs=actions.mixture, api_visibility="private"
    )
    actions.add_dataset.focus(
        lambda: gr.Dropdown(choices=services.dataset_names(ctx=ctx)),
        outputs=actions.add_dataset,
        api_visibility="private",
    )
    # These write into inputs (the form, the mixture picker): without progress, a refusal is a message and leaves
    # them usable, where Gradio would otherwise lay an "Error" overlay over each one.
    actions.open.click(
        open_mixture, inputs=actions.mixture, outputs=prefill_outputs, api_name="open_mixture", show_progress="hidden"
    )
    actions.duplicate.click(
        duplicate_mixture,
        inputs=[actions.mixture, actions.new_name],
        outputs=changed,
        api_name="duplicate_mixture",
        show_progress="hidden",
    )
    actions.add_task.click(
        add_task,
        inputs=[actions.mixture, actions.add_dataset, actions.child_name],
        outputs=changed,
        api_name="add_task",
        show_progress="hidden",
    )
    return actions.train.click(
        start_training, inputs=actions.mixture, outputs=[actions.job_id, actions.status], api_name="start_training"
    )


def form_values(spec: MixtureSpec | dict | str, ctx: StudioContext | None = None) -> list[Any]:
    """Values for the form's components (``TabHandles.form`` order) showing ``spec``; the target checkboxes offer the
    spec's base's layers when that base can be read."""
    form = services.form_from_spec(spec)
    values = [getattr(form, name) for name in services.FORM_FIELDS]
    choices = list(form.target_modules or [])
    if ctx is not None:
        try:
            choices = services.inspect_base(ctx=ctx, base_model=form.base_model).linear_modules
        except ServiceError:
            pass
    choices += [m for m in form.target_modules or [] if m not in choices]
    values[services.FORM_FIELDS.index("target_modules")] = gr.CheckboxGroup(choices=choices, value=form.target_modules)
    return values


def prefill_from_spec(spec_json: dict | str | None, ctx: StudioContext | None = None) -> list[Any]:
    """Values for ``TabHandles.prefill_outputs`` that load ``spec_json`` into a new mixture's form ("use in a new
    mixture"): the form, the datasets holding its tasks (with ``ctx``), no parent, and a note. A spec that does not
    validate is refused with ``gr.Error``."""
    try:
        values = form_values(spec_json, ctx)
    except ServiceError as error:
        raise gr.Error(str(error)) from error
    tasks = services.form_from_spec(spec_json).tasks
    if ctx is None:
        chosen = gr.skip()
    else:
        chosen = gr.Dropdown(
            choices=services.dataset_names(ctx=ctx),
            value=services.datasets_for_tasks(ctx=ctx, tasks=services.split_names(tasks)),
            multiselect=True,
        )
    return [*values, chosen, "", strings.COMPOSE_PREFILLED.format(tasks=tasks)]
