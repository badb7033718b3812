"""Attach a ``MixtureSpec`` to a Hugging Face model; save, load and export its experts; trace its routing.

``attach_mixture`` replaces each target ``nn.Linear`` by a ``MixtureLinear`` sharing one ``RoutingState``.
Experts are saved as safetensors (one file per expert, one for the routers) with a JSON manifest of sha256
sums; nothing is ever unpickled. ``export_peft_adapter`` writes one expert (or universal + one specific expert,
concatenated in rank space, ALGORITHMS.md §7) as a plain PEFT LoRA adapter.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.bases import PICKLE_SUFFIXES, load_base
from models.experts import MixtureLinear, RoutingState, RoutingTrace
from models.routers import ROUTER_KINDS, RoutingInputs, SemanticRouter
from models.spec import MixtureSpec

ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MANIFEST = "manifest.json"
ROUTERS_FILE = "routers.safetensors"
SHARED_FILE = "shared.safetensors"
EXTRAS_FILE = "extras.safetensors"


class MixtureError(ValueError):
    """A spec that does not fit the model, or expert files that do not fit the spec."""


class UnsafeWeightsError(MixtureError):
    """Weights in a format that can run code when loaded (pickle)."""


def _target_linears(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    if not found:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise MixtureError(
            f"target modules {list(targets)} match no linear layer of the base; available: {', '.join(available)}"
        )
    missing = [t for t in targets if not any(name.rsplit(".", 1)[-1] == t for name in found)]
    if missing:
        raise MixtureError(f"target module(s) {missing} match no linear layer of the base")
    return found


def _build_router(spec: MixtureSpec, d_in: int):  # noqa: ANN202 - Router | None
    if spec.router.kind == "single":
        return None
    cls = ROUTER_KINDS[spec.router.kind]
    routed = len(spec.experts) + (spec.universal.count if spec.routes_universal else 0)
    rank = spec.experts[0].rank if spec.experts else 0
    return cls(
        spec.router_options,
        d_in=d_in,
        n_experts=routed,
        n_tasks=len(spec.tasks),
        rank=rank,
        task_experts=spec.task_experts(),
        groups=spec.group_ids(),
    )


def universal_names(spec: MixtureSpec) -> list[str]:
    return [f"universal-{i}" for i in range(spec.universal.count)]


class MixtureModel(nn.Module):
    """A Hugging Face causal LM with a mixture attached; ``forward`` and ``generate`` take the routing inputs."""

    def __init__(self, model: nn.Module, spec: MixtureSpec) -> None:
        super().__init__()
        self.model, self.spec, self.state = model, spec, RoutingState()
        for p in model.parameters():
            p.requires_grad_(False)
        self.layer_names: list[str] = []
        for name, linear in _target_linears(model, spec.target_modules).items():
            layer = MixtureLinear(
                linear,
                name=name,
                state=self.state,
                universal=[(spec.universal.rank, spec.universal.alpha)] * spec.universal.count,
                specific=[(e.rank, e.alpha) for e in spec.experts],
                expert_names=self.expert_names,
                router=_build_router(spec, linear.in_features),
                routes_universal=spec.routes_universal,
                dropout=spec.lora_dropout,
            )
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            self.layer_names.append(name)
        self._own_extras()

    @property
    def expert_names(self) -> list[str]:
        return universal_names(self.spec) + [e.name for e in self.spec.experts]

    def layers(self) -> Iterator[MixtureLinear]:
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            assert isinstance(module, MixtureLinear)
            yield module

    def store_base_in(self, dtype: torch.dtype) -> None:
        """Keep the frozen base's parameters in ``dtype`` (inference: bf16 halves what each token reads).

        Experts and routers keep fp32: their matrices are small, so memory traffic is not what they cost, and small
        bf16 matmuls are slower than fp32 ones on a CPU (1 x 576 by 576 x 40: 25 us against 5 us here). A mixture
        layer casts its input to the experts' dtype and adds their delta back in the base's. Buffers (rotary
        frequencies) are left as they are.
        """
        own = {
            id(p)
            for layer in self.layers()
            for part in (layer.experts, layer.shared, layer.router)
            if part is not None
            for p in part.parameters()
        }
        for p in self.model.parameters():
            if id(p) not in own and p.is_floating_point():
                p.data = p.data.to(dtype)

    def _own_extras(self) -> None:
        """The universal expert's optional trainable embeddings / head: trainable copies, the base's kept apart."""
        if self.spec.universal.train_embeddings:
            self.model.set_input_embeddings(copy.deepcopy(self.model.get_input_embeddings()))
        if self.spec.universal.train_head:
            self.model.set_output_embeddings(copy.deepcopy(self.model.get_output_embeddings()))

    def extras(self) -> dict[str, nn.Module]:
        found = {}
        if self.spec.universal.train_embeddings:
            found["embeddings"] = self.model.get_input_embeddings()
        if self.spec.universal.train_head:
            found["head"] = self.model.get_output_embeddings()
        return found

    # --- which parameters train ---

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by owner: ``expert:<name>``, ``shared`` (SAMoRA's A and σ), ``router``, ``extras``."""
        groups: dict[str, list[nn.Parameter]] = {f"expert:{n}": [] for n in self.expert_names}
        groups |= {"shared": [], "router": [], "extras": []}
        for layer in self.layers():
            for i in range(len(self.expert_names)):
                groups[f"expert:{self.expert_names[i]}"].extend(layer.expert_tensors(i).values())  # type: ignore[arg-type]
            if layer.shared is not None:
                groups["shared"] += [layer.shared.shared_down, layer.shared.sigma]
            if layer.router is not None:
                groups["router"] += list(layer.router.parameters())
        for module in self.extras().values():
            groups["extras"] += list(module.parameters())
        return groups

    def set_trainable(
        self, *, experts: Sequence[str] = (), router: bool = False, shared: bool = False, extras: bool = False
    ) -> int:
        """Freeze everything, then unfreeze the named experts (and router / shared / extras); returns the count."""
        for p in self.parameters():
            p.requires_grad_(False)
        chosen = [f"expert:{n}" for n in experts] + ["router"] * router + ["shared"] * shared + ["extras"] * extras
        groups = self.parameter_groups()
        for key in chosen:
            for p in groups[key]:
                p.requires_grad_(True)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(mixture parameters, base parameters) — what the composer shows as a percentage."""
        groups = self.parameter_groups()
        seen: set[int] = set()
        mixture = 0
        for params in groups.values():
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    mixture += p.numel()
        base = sum(p.numel() for p in self.model.parameters() if id(p) not in seen)
        return mixture, base

    # --- running ---

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        task_ids: Tensor | None = None,
        sentence_embedding: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward (no loss computed here); routing sees the prompt through ``labels == -100``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        token_mask = attention_mask.bool()
        prompt_mask = token_mask & (labels == -100) if labels is not None else token_mask
        self.state.reset(
            RoutingInputs(
                task_ids=task_ids,
                prompt_mask=prompt_mask,
                token_mask=token_mask,
                sentence_embedding=sentence_embedding,
            )
        )
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def router_loss(self) -> Tensor | None:
        """Router losses of the last forward (load balance, z-loss) plus SAMoRA's regulariser, summed over layers."""
        losses = list(self.state.aux_losses)
        for layer in self.layers():
            if isinstance(layer.router, SemanticRouter) and layer.shared is not None and layer.router.training:
                losses.append(layer.router.regulariser(layer.shared.shared_down, list(layer.shared.up)))
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        task_ids: Tensor | None = None,
        sentence_embedding: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """HF ``generate`` with the KV cache; sequence-level gates are computed on the prompt once and reused."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = RoutingInputs(
            task_ids=task_ids, prompt_mask=attention_mask.bool(), sentence_embedding=sentence_embedding
        )
        with self.generation(inputs):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @contextmanager
    def generation(self, inputs: RoutingInputs) -> Iterator[None]:
        """Decoding calls of the block belong to one generation: gates fixed for the sequence are computed on its
        prompt (the block's first forward) and reused by every later step."""
        self.state.reset(inputs, generating=True)
        try:
            yield
            if self.state.trace is not None:
                for layer in self.layers():
                    layer.trace_decoded_steps()
        finally:
            self.state.generating = False
            self.state.sequence_gates.clear()
            self.state.decode_cache.clear()

    @contextmanager
    def tracing(self) -> Iterator[RoutingTrace]:
        """Record router weights of every layer while the block runs; nothing is recorded (or hooked) otherwise."""
        trace = RoutingTrace()
        self.state.trace = trace
        try:
            yield trace
        finally:
            self.state.trace = None

    @contextmanager
    def overridden(self, *, forced: dict[str, float] | None = None, disabled: Sequence[str] = ()) -> Iterator[None]:
        """Force router weights (expert name -> weight) and/or switch experts off for the block."""
        unknown = [n for n in [*(forced or {}), *disabled] if n not in self.expert_names]
        if unknown:
            raise MixtureError(f"unknown expert(s) {unknown}; the mixture has {self.expert_names}")
        self.state.forced, self.state.disabled = forced, frozenset(disabled)
        try:
            yield
        finally:
            self.state.forced, self.state.disabled = None, frozenset()

    @contextmanager
    def own_task_routing(self, *, universal_on: bool = True) -> Iterator[None]:
        """Route every sample to the experts of its own task (the router is not used) for the block.

        ``universal_on=False`` switches the universal experts off (MoDULA-Flan's domain stage).
        """
        spec = self.spec
        n_universal = spec.universal.count if spec.routes_universal else 0
        table = torch.zeros(len(spec.tasks) + 1, n_universal + len(spec.experts))
        for task, experts in enumerate(spec.task_experts()):
            for e in experts:
                table[task, n_universal + e] = 1.0 / len(experts)
        self.state.task_table = table
        self.state.disabled = frozenset() if universal_on else frozenset(universal_names(spec))
        try:
            yield
        finally:
            self.state.task_table, self.state.disabled = None, frozenset()

    # --- growing: the add_task schedule ---

    def add_task_expert(self, new_spec: MixtureSpec) -> str:
        """Plug in the one expert that ``new_spec`` adds (``MixtureSpec.with_task_expert``); returns its name."""
        if len(new_spec.experts) != len(self.spec.experts) + 1 or new_spec.experts[:-1] != self.spec.experts:
            raise MixtureError("add_task expects the same experts plus exactly one new one")
        expert = new_spec.experts[-1]
        task_id = new_spec.tasks.index(expert.tasks[0])
        group = new_spec.group_ids()[-1]
        for layer in self.layers():
            old_shapes = {n: p.shape for n, p in layer.router.named_parameters()} if layer.router is not None else {}
            layer.add_expert(expert.name, expert.rank, expert.alpha, task_id=task_id, group=group)
            if layer.router is not None:
                _train_only_new_rows(layer.router, old_shapes)
        self.spec = new_spec
        return expert.name


def _train_only_new_rows(router: nn.Module, old_shapes: dict[str, torch.Size]) -> None:
    """Mask the gradients of what the router had before the new expert: its old rows (and parameters that did not
    grow) stay bit-identical, and so does its query centre, so the old tasks keep their routing; only the new
    expert's rows learn. With zero gradients from a fresh optimizer, Adam(W) without weight decay leaves them
    exactly as they were."""
    router.center_frozen = True  # type: ignore[assignment]
    for name, param in router.named_parameters():
        old = old_shapes.get(name)
        if old is None:
            continue  # a parameter the new expert brought: all of it learns
        mask = torch.zeros_like(param)
        if param.shape != old:
            mask[old[0] :] = 1.0  # grown by rows: the new rows learn
        param.register_hook(lambda grad, mask=mask: grad * mask)


def attach_mixture(model: nn.Module, spec: MixtureSpec) -> MixtureModel:
    """Freeze ``model`` and put the mixture of ``spec`` on its target linears (B = 0: outputs unchanged)."""
    return MixtureModel(model, spec)


# --- saving and loading (safetensors only) --------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def expert_file(name: str) -> str:
    return f"expert-{name}.safetensors"


def _state_by_file(mixture: MixtureModel) -> dict[str, dict[str, Tensor]]:
    files: dict[str, dict[str, Tensor]] = {expert_file(n): {} for n in mixture.expert_names}
    files |= {ROUTERS_FILE: {}, SHARED_FILE: {}, EXTRAS_FILE: {}}
    for layer in mixture.layers():
        for i, name in enumerate(mixture.expert_names):
            for key, tensor in layer.expert_tensors(i).items():
                files[expert_file(name)][f"{layer.name}.{key}"] = tensor
        if layer.router is not None:
            for key, tensor in layer.router.state_dict().items():
                files[ROUTERS_FILE][f"{layer.name}.router.{key}"] = tensor
        if layer.shared is not None:
            files[SHARED_FILE][f"{layer.name}.shared_down"] = layer.shared.shared_down
            files[SHARED_FILE][f"{layer.name}.sigma"] = layer.shared.sigma
    for key, module in mixture.extras().items():
        for param_name, tensor in module.state_dict().items():
            files[EXTRAS_FILE][f"{key}.{param_name}"] = tensor
    return {name: tensors for name, tensors in files.items() if tensors}


def save_experts(mixture: MixtureModel, folder: str | os.PathLike[str]) -> dict[str, str]:
    """Write every expert, the routers and the manifest into ``folder``; returns file name -> sha256."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for file_name, tensors in _state_by_file(mixture).items():
        path = folder / file_name
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        checksums[file_name] = _sha256(path)
    manifest = {
        "format": "mole-studio-experts",
        "version": 1,
        "spec": mixture.spec.model_dump(mode="json"),
        "experts": mixture.expert_names,
        "files": checksums,
    }
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return checksums


def refuse_pickles(folder: Path) -> None:
    """Refuse, don't skip: any pickle-format file next to the experts fails the load before anything is read."""
    found = sorted(p.name for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise UnsafeWeightsError(
            f"{folder.name} contains pickle files ({', '.join(found)}); only .safetensors is accepted"
        )


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    folder = Path(folder)
    refuse_pickles(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise MixtureError(f"no {MANIFEST} in {folder.name}: not a saved mixture")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MixtureError(f"{MANIFEST} in {folder.name} is damaged: {error}") from error
    if manifest.get("format") != "mole-studio-experts":
        raise MixtureError(f"{MANIFEST} in {folder.name} is not a MoLE Studio manifest")
    return manifest


def _load_checked(path: Path, expected_sha: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise MixtureError(f"expert file {path.name} is missing")
    if _sha256(path) != expected_sha:
        raise MixtureError(f"expert file {path.name} does not match its checksum: damaged or altered")
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error types for truncated or bad headers
        raise MixtureError(f"expert file {path.name} is not a readable safetensors file: {error}") from error


def load_experts(
    mixture: MixtureModel, folder: str | os.PathLike[str], *, experts: Sequence[str] | None = None
) -> None:
    """Load saved tensors into ``mixture`` after checking files, checksums, keys, shapes and dtypes.

    ``experts`` loads only those experts (and SAMoRA's shared factors): enough to export one of them from a run
    whose other expert files were deleted; routers and extras stay as attached.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    wanted = None if experts is None else {expert_file(name) for name in experts} | {SHARED_FILE}
    for file_name, targets in _state_by_file(mixture).items():
        if wanted is not None and file_name not in wanted:
            continue
        if file_name not in manifest["files"]:
            raise MixtureError(f"the saved mixture has no {file_name}")
        tensors = _load_checked(folder / file_name, manifest["files"][file_name])
        _copy_checked(file_name, tensors, targets)


def load_trained_mixture(
    folder: str | os.PathLike[str], *, data_dir: Path, device: torch.device | str = "cpu"
) -> tuple[MixtureModel, Any]:
    """A saved mixture as it was trained: its manifest's spec (an ``add_task`` run's grown one), the base, the
    experts; in eval mode on ``device``. Returns the mixture and the base's tokenizer."""
    spec = MixtureSpec.model_validate(read_manifest(folder)["spec"])
    model, tokenizer = load_base(spec.base_model, data_dir, device=device)
    mixture = attach_mixture(model, spec)
    load_experts(mixture, folder)
    return mixture.to(device).eval(), tokenizer


def _copy_checked(file_name: str, tensors: dict[str, Tensor], targets: dict[str, Tensor]) -> None:
    unexpected = sorted(set(tensors) - set(targets))
    missing = sorted(set(targets) - set(tensors))
    if unexpected:
        raise MixtureError(f"{file_name} holds tensors for modules the spec does not declare: {unexpected[:3]}")
    if missing:
        raise MixtureError(f"{file_name} lacks tensors the spec needs: {missing[:3]}")
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = targets[key]
            if tensor.dtype not in ALLOWED_DTYPES and tensor.dtype != target.dtype:
                raise MixtureError(f"{file_name}: {key} has dtype {tensor.dtype}; expected a float type")
            if tensor.shape != target.shape:
                raise MixtureError(
                    f"{file_name}: {key} has shape {tuple(tensor.shape)}, the spec needs {tuple(target.shape)}"
                )
            target.copy_(tensor)


# --- export as a plain PEFT LoRA adapter ----------------------------------------------------------------------


def export_peft_adapter(
    mixture: MixtureModel, expert: str, folder: str | os.PathLike[str], *, with_universal: bool = True
) -> Path:
    """Write ``expert`` (joined with the universal experts when ``with_universal``) as a PEFT LoRA adapter.

    Joined experts become one LoRA of rank ``Σ r`` with ``lora_alpha = Σ r`` (scaling 1) and each expert's own
    scaling folded into its block of B: ``A = [A_u; A_e]``, ``B = [s_u B_u, s_e B_e]``.
    """
    from peft import LoraConfig

    names = mixture.expert_names
    if expert not in names:
        raise MixtureError(f"unknown expert {expert!r}; the mixture has {names}")
    chosen = [expert]
    if with_universal and expert not in universal_names(mixture.spec):
        chosen = universal_names(mixture.spec) + chosen
    indices = [names.index(n) for n in chosen]
    tensors: dict[str, Tensor] = {}
    ranks = set()
    for layer in mixture.layers():
        parts = [layer.effective_lora(i) for i in indices]
        a = torch.cat([p[0] for p in parts])  # (Σr, d_in)
        if len(parts) == 1:
            b, alpha = parts[0][1], parts[0][2] * parts[0][0].shape[0]
        else:
            b, alpha = torch.cat([s * up for _, up, s in parts], dim=1), float(a.shape[0])  # (d_out, Σr)
        ranks.add((a.shape[0], alpha))
        tensors[f"base_model.model.{layer.name}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"base_model.model.{layer.name}.lora_B.weight"] = b.detach().contiguous().cpu()
    ((rank, alpha),) = ranks
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(mixture.spec.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=mixture.spec.base_model,
    )
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def export_route(mixture: MixtureModel, expert: str, *, with_universal: bool = True) -> dict[str, Any]:
    """``overridden(**route)`` arguments that make the mixture compute what ``export_peft_adapter`` exported."""
    universal = universal_names(mixture.spec)
    forced = {expert: 1.0} if expert not in universal else {}
    if mixture.spec.routes_universal and with_universal:
        forced |= dict.fromkeys(universal, 1.0)
    disabled = [] if with_universal else [n for n in universal if n != expert]
    return {"forced": forced, "disabled": disabled}
