"""The composer's SVG drawing, read back as XML: its experts, groups, router and caption match the spec."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from app.services import diagram
from models.bases import BUILTIN_TINY
from models.spec import MixtureSpec, default_spec

SVG = "{http://www.w3.org/2000/svg}"
SHAPES = {"q_proj": (128, 128, 4), "v_proj": (128, 128, 4), "down_proj": (256, 128, 4)}


def draw(spec: MixtureSpec, trainable: int = 53_248, base: int = 689_664) -> ET.Element:
    svg = diagram.mixture_svg(spec, base_label="Tiny base", base_parameters=base, trainable=trainable, shapes=SHAPES)
    return ET.fromstring(svg)  # well-formed XML, or this raises


def texts(element: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in element.iter(f"{SVG}text")]


def groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == cls]


def test_the_drawing_shows_base_layers_experts_router_and_the_count() -> None:
    spec = default_spec(BUILTIN_TINY, ["dates", "emails", "times"], router="topk", target_modules=["q_proj", "v_proj"])
    root = draw(spec)
    assert root.tag == f"{SVG}svg"
    experts = {g.get("data-name"): (g.get("data-kind"), g.get("data-tasks")) for g in groups(root, "expert")}
    assert experts == {
        "universal-0": ("universal", "dates,emails,times"),
        "dates-expert": ("task", "dates"),
        "emails-expert": ("task", "emails"),
        "times-expert": ("task", "times"),
    }
    (router,) = groups(root, "router")
    assert router.get("data-kind") == "topk"
    assert "Router: topk" in texts(router) and "top_k = 2" in texts(router)
    (layers,) = groups(root, "layers")
    assert texts(layers)[1:] == ["q_proj  128→128 ×4", "v_proj  128→128 ×4"]
    assert "Trainable: 53,248 parameters (7.72% of the base's 689,664)" in texts(root)
    assert any("tasks: emails" in t for t in texts(root))


def test_the_grouped_router_draws_its_groups_around_their_experts() -> None:
    data = default_spec(BUILTIN_TINY, ["dates", "emails", "times"], router="grouped").model_dump()
    data["experts"][0]["group"] = data["experts"][2]["group"] = "text"
    root = draw(MixtureSpec.model_validate(data))
    frames = groups(root, "group")
    assert [g.get("data-name") for g in frames] == ["text", "emails-expert"]
    assert "group text" in texts(frames[0])
    expert_names = [g.get("data-name") for g in groups(root, "expert")]
    assert expert_names == ["universal-0", "dates-expert", "times-expert", "emails-expert"]  # drawn by group


def test_a_plain_lora_has_no_router_and_a_tiny_share_is_shown_with_three_digits() -> None:
    root = draw(default_spec(BUILTIN_TINY, ["dates"], router="single"), trainable=1_234, base=134_515_008)
    assert [g.get("data-name") for g in groups(root, "expert")] == ["universal-0"]
    assert texts(groups(root, "router")[0]) == ["Router: single", "no router:", "one plain LoRA"]
    assert "Trainable: 1,234 parameters (0.000917% of the base's 134,515,008)" in texts(root)


def test_modula_flan_routes_the_universal_experts_too() -> None:
    data = default_spec(BUILTIN_TINY, ["dates"], router="modula").model_dump()
    data["router"]["options"] = {"variant": "flan"}
    root = draw(MixtureSpec.model_validate(data))
    assert "Universal experts · routed (MoDULA-Flan)" in texts(root)
    assert len([p for p in root.iter(f"{SVG}path") if p.get("stroke-dasharray")]) == 2  # router → both kinds


def test_labels_are_escaped_and_the_message_drawing_lists_each_problem() -> None:
    spec = default_spec(BUILTIN_TINY, ["dates"])
    svg = diagram.mixture_svg(spec, base_label="<b>a&b ${x}</b>", base_parameters=10, trainable=1, shapes=SHAPES)
    assert "<b>" not in svg and "${" not in svg
    assert "&lt;b&gt;a&amp;b" in svg
    root = ET.fromstring(diagram.message_svg("universal.rank: too small\nschedule: <bad>"))
    assert texts(root) == ["universal.rank: too small", "schedule: <bad>"]
