"""The composer's drawing of a mixture, as an inline SVG string: base → target layers → universal and task experts
→ router, with the trainable-parameter count in the caption.

Plain string building, no plotting library: the drawing is a handful of boxes, it must redraw on every form change,
and as text it can be checked by parsing it. Every label is escaped; names come from the spec, whose rules already
keep them short and plain.
"""

from __future__ import annotations

from collections.abc import Iterable
from xml.sax.saxutils import escape, quoteattr

from models.spec import MixtureSpec

WIDTH = 840
TOP = 44
LINE = 15
BOX = 40  # height of one expert box
GAP = 8
BASE_X, BASE_W = 8, 150
LAYERS_X, LAYERS_W = 190, 172
EXPERTS_X, EXPERTS_W = 394, 250
ROUTER_X, ROUTER_W = 676, 156
COLOURS = {
    "base": ("#f1f5f9", "#64748b"),
    "layers": ("#ede9fe", "#7c3aed"),
    "universal": ("#dbeafe", "#2563eb"),
    "task": ("#dcfce7", "#16a34a"),
    "router": ("#fef3c7", "#d97706"),
}
_FONT = 'font-family="ui-sans-serif, system-ui, sans-serif"'
_TEXT_STYLE = {  # presentation attributes, not a <style> sheet: the page's HTML template reads braces as its own
    "": 'font-size="12" fill="#0f172a"',
    "title": 'font-size="12" font-weight="600" fill="#0f172a"',
    "small": 'font-size="11" fill="#334155"',
    "head": 'font-size="12" font-weight="600" fill="#475569"',
    "caption": 'font-size="13" font-weight="600" fill="#0f172a"',
    "message": 'font-size="13" fill="#b91c1c"',
}


def _text(value: object, limit: int = 44) -> str:
    """Escaped, shortened text; characters the page's HTML template would read as placeholders are dropped."""
    text = str(value).replace("$", "").replace("{", "").replace("}", "")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return escape(text)


def _label(x: float, y: float, text: object, cls: str = "", limit: int = 44) -> str:
    attr = f" class={quoteattr(cls)}" if cls else ""
    return f'<text x="{x:.0f}" y="{y:.0f}"{attr} {_FONT} {_TEXT_STYLE[cls]}>{_text(text, limit)}</text>'


def _rect(x: float, y: float, w: float, h: float, kind: str, *, dashed: bool = False) -> str:
    fill, stroke = COLOURS[kind]
    dash = ' stroke-dasharray="5 3"' if dashed else ""
    return (
        f'<rect x="{x:.0f}" y="{y:.0f}" width="{w:.0f}" height="{h:.0f}" rx="6" '
        f'fill="{"none" if dashed else fill}" stroke="{stroke}" stroke-width="1.2"{dash}/>'
    )


def _arrow(x1: float, y1: float, x2: float, y2: float, label: str = "", *, dashed: bool = False) -> str:
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    line = (
        f'<path d="M{x1:.0f},{y1:.0f} C{(x1 + x2) / 2:.0f},{y1:.0f} {(x1 + x2) / 2:.0f},{y2:.0f} {x2:.0f},{y2:.0f}" '
        f'fill="none" stroke="#64748b" stroke-width="1.4" marker-end="url(#arrow)"{dash}/>'
    )
    if label:
        line += _label(x1 + 3, min(y1, y2) - 5, label, "small")
    return line


def _group(kind: str, name: str, body: Iterable[str]) -> str:
    return f"<g class={quoteattr(kind)} data-name={quoteattr(name)}>{''.join(body)}</g>"


def _number(n: int) -> str:
    """134515008 -> 134.5M; small numbers as they are, with thousands separators."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:,}"


def caption(trainable: int, base: int, percent: float) -> str:
    """The drawing's caption: the trainable parameters and their share of the base."""
    share = f"{percent:.2f}" if percent >= 0.1 else f"{percent:.3g}"
    return f"Trainable: {trainable:,} parameters ({share}% of the base's {base:,})"


def _wrap(text: str, width: int, lines: int) -> list[str]:
    """Words into at most ``lines`` lines of about ``width`` characters (the last one shortened if need be)."""
    out: list[str] = []
    for word in text.split():
        if out and len(out[-1]) + 1 + len(word) <= width:
            out[-1] += " " + word
        else:
            out.append(word)
    return out[: lines - 1] + [" ".join(out[lines - 1 :])] if len(out) > lines else out


def _base(spec: MixtureSpec, label: str, base_parameters: int) -> tuple[str, float]:
    names = _wrap(label, 19, 2) or [spec.base_model]
    height = (len(names) + 2) * LINE + 16
    body = [_rect(BASE_X, TOP, BASE_W, height, "base"), _label(BASE_X + 10, TOP + 20, "Base model (frozen)", "head")]
    body += [_label(BASE_X + 10, TOP + 20 + (i + 1) * LINE, line, "title", 20) for i, line in enumerate(names)]
    body.append(
        _label(BASE_X + 10, TOP + 20 + (len(names) + 1) * LINE, f"{_number(base_parameters)} parameters", "small")
    )
    return _group("base", spec.base_model, body), TOP + height / 2


def _layers(spec: MixtureSpec, shapes: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    height = (len(spec.target_modules) + 1) * LINE + 16
    body = [_rect(LAYERS_X, TOP, LAYERS_W, height, "layers"), _label(LAYERS_X + 10, TOP + 20, "Target layers", "head")]
    for i, module in enumerate(spec.target_modules):
        d_in, d_out, count = shapes.get(module, (0, 0, 0))
        detail = f"{module}  {d_in}→{d_out} ×{count}" if count else f"{module}  (not in the base)"
        body.append(_label(LAYERS_X + 10, TOP + 20 + (i + 1) * LINE, detail, "small", 27))
    return _group("layers", ",".join(spec.target_modules), body), TOP + height / 2


def _expert_box(x: float, y: float, w: float, kind: str, name: str, detail: str, tasks: list[str]) -> str:
    body = [
        _rect(x, y, w, BOX, kind),
        _label(x + 8, y + 16, name, "title", 34),
        _label(x + 8, y + 31, detail, "small", 40),
    ]
    return (
        f'<g class="expert" data-kind={quoteattr(kind)} data-name={quoteattr(name)} '
        f"data-tasks={quoteattr(','.join(tasks))}>{''.join(body)}</g>"
    )


def _universal(spec: MixtureSpec, y: float) -> tuple[list[str], float, float]:
    """The universal experts' boxes from ``y``; returns the parts, their middle and the y below them."""
    u = spec.universal
    how = "routed (MoDULA-Flan)" if spec.routes_universal else "always on"
    parts = [_label(EXPERTS_X, y + 12, f"Universal experts · {how}", "head")]
    y += 20
    top = y
    if u.count == 0:
        parts.append(_label(EXPERTS_X + 8, y + 14, "none", "small"))
        return parts, y + 8, y + 24
    extras = [w for w, on in (("embeddings", u.train_embeddings), ("head", u.train_head)) if on]
    detail = f"r{u.rank} · α{u.alpha:g} · all tasks" + (f" · + {', '.join(extras)}" if extras else "")
    for i in range(u.count):
        parts.append(_expert_box(EXPERTS_X, y, EXPERTS_W, "universal", f"universal-{i}", detail, list(spec.tasks)))
        y += BOX + GAP
    return parts, (top + y - GAP) / 2, y


def _task_experts(spec: MixtureSpec, y: float) -> tuple[list[str], float, float]:
    """The task experts' boxes from ``y`` (in group frames for the grouped router)."""
    parts = [_label(EXPERTS_X, y + 12, "Task experts · routed", "head")]
    y += 20
    top = y
    if not spec.experts:
        parts.append(_label(EXPERTS_X + 8, y + 14, "none (plain LoRA)", "small"))
        return parts, y + 8, y + 24
    grouped = spec.router.kind == "grouped"
    groups = spec.group_names() if grouped else [None]
    ids = spec.group_ids()
    for index, group in enumerate(groups):
        members = [e for e, g in zip(spec.experts, ids, strict=True) if not grouped or g == index]
        inset = 10 if grouped else 0
        start = y
        if grouped:
            y += 18
        for e in members:
            detail = f"r{e.rank} · α{e.alpha:g} · tasks: {', '.join(e.tasks)}"
            parts.append(
                _expert_box(EXPERTS_X + inset, y, EXPERTS_W - 2 * inset, "task", e.name, detail, list(e.tasks))
            )
            y += BOX + GAP
        if grouped:
            frame = [
                _rect(EXPERTS_X, start, EXPERTS_W, y - start + 2, "task", dashed=True),
                _label(EXPERTS_X + 8, start + 13, f"group {group}", "small"),
            ]
            parts.append(_group("group", str(group), frame))
            y += GAP + 4
    return parts, (top + y - GAP) / 2, y


def _router(spec: MixtureSpec, y: float) -> tuple[str, float]:
    kind = spec.router.kind
    if kind == "single":
        lines = ["no router:", "one plain LoRA"]
    else:
        lines = [f"{key} = {value}" for key, value in spec.router.options.items()]
    height = (len(lines) + 1) * LINE + 16
    body = [_rect(ROUTER_X, y, ROUTER_W, height, "router"), _label(ROUTER_X + 10, y + 20, f"Router: {kind}", "title")]
    body += [_label(ROUTER_X + 10, y + 20 + (i + 1) * LINE, line, "small", 23) for i, line in enumerate(lines)]
    return f'<g class="router" data-kind={quoteattr(kind)}>{"".join(body)}</g>', y + height


def mixture_svg(
    spec: MixtureSpec,
    *,
    base_label: str,
    base_parameters: int,
    trainable: int,
    shapes: dict[str, tuple[int, int, int]],
) -> str:
    """The whole drawing. ``shapes``: target leaf name -> (d_in, d_out, how many in the base)."""
    base, base_mid = _base(spec, base_label, base_parameters)
    layers, layers_mid = _layers(spec, shapes)
    universal, universal_mid, y = _universal(spec, TOP - 20)
    task, task_mid, bottom = _task_experts(spec, y + 6)
    router, router_bottom = _router(spec, y + 26)
    arrows = [
        _arrow(BASE_X + BASE_W, base_mid, LAYERS_X - 4, layers_mid),
        _arrow(LAYERS_X + LAYERS_W, layers_mid, EXPERTS_X - 4, universal_mid, "LoRA"),
        _arrow(LAYERS_X + LAYERS_W, layers_mid, EXPERTS_X - 4, task_mid),
    ]
    if spec.router.kind != "single":
        arrows.append(_arrow(ROUTER_X, y + 46, EXPERTS_X + EXPERTS_W + 4, task_mid, dashed=True))
        if spec.routes_universal:
            arrows.append(_arrow(ROUTER_X, y + 46, EXPERTS_X + EXPERTS_W + 4, universal_mid, dashed=True))
    percent = 100.0 * trainable / base_parameters if base_parameters else 0.0
    height = max(bottom, router_bottom, TOP + 120) + 34
    text = caption(trainable, base_parameters, percent)
    parts = [base, layers, *universal, *task, router, *arrows]
    return _svg(height, parts, _label(BASE_X, height - 14, text, "caption", 120))


PLACEHOLDER = "The mixture is drawn here once the form describes a valid one."


def message_svg(message: str = PLACEHOLDER) -> str:
    """What is drawn while the form does not make a valid mixture: a note, or the reasons, one per line."""
    lines = [line for line in message.splitlines() if line.strip()][:8] or ["nothing to draw yet"]
    body = [_label(BASE_X, 28 + i * 20, line, "message", 110) for i, line in enumerate(lines)]
    return _svg(40 + 20 * len(lines), body, "")


def _svg(height: float, parts: list[str], caption_text: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height:.0f}" width="100%" '
        f'role="img" aria-label="mixture diagram" style="max-width:{WIDTH}px">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#64748b"/></marker></defs>'
        f"{''.join(parts)}{caption_text}</svg>"
    )
