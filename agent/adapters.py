"""LoRA adapter versions: a policy version that is an adapter (MB where the model is GB) over a fixed base folder.

An adapter version's folder holds the adapter (peft's save_pretrained), `base.json` (agent/versions.py: the base
folder's absolute path and the sha256 of its files, taken when the version was saved), the recycling matrix and
arbor_meta.json. Loading one refuses a base whose files changed since, and puts the adapter over the base, which a
process loads once (keyed by that hash, the newest base only: one GPU holds one base) and shares between the versions
over it.

Every PeftModel made here sits on a *view* of its base: a module tree of its own whose weights are the base's tensors,
so two versions, or a version and its training candidate, never copy the base. The base weights are frozen in all of
them; never merge such a model in place (merge_and_unload writes into the shared weights): `merged_copy` copies first.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import sys
import warnings
from pathlib import Path

import torch

from agent.policy import Policy, PolicyLoadError, load_policy
from agent.versions import BASE_FILE, folder_hash, read_base
from memory.recycling import RecyclingMemory
from search.prompt_format import PromptFormat


def is_adapter(model) -> bool:
    # peft takes seconds to import: a process that never imported it holds no PeftModel
    return "peft" in sys.modules and isinstance(model, sys.modules["peft"].PeftModel)


def checked_base(folder: str | Path, version: str) -> dict:
    """The base of adapter version `folder`, refused with one line when its folder is gone or its files changed."""
    base = read_base(folder)
    fix = "restore that base or promote a full version"
    if not Path(base["path"]).is_dir():
        raise PolicyLoadError(f"policy {version} is a LoRA adapter over {base['path']}, which is gone: {fix}")
    now = folder_hash(base["path"])
    if now != base["sha256"]:
        raise PolicyLoadError(f"policy {version} is a LoRA adapter over {base['path']}, whose contents changed since "
                              f"(sha256 {now[:12]} != {base['sha256'][:12]}): {fix}")
    return base


# ---- configs and copies ----

# FineTuneConfig.adapter "auto" trains LoRA from this size on. Measured (bench/fine_tune_memory.py): up to 191M
# parameters a LoRA trainer held no less memory than a full one (activations dominate) and took 15-23% longer a step;
# past it full fine-tuning needs 12 more bytes a parameter (gradients and AdamW moments) and a full version is 61x an
# adapter. Every model a user brings (0.5B-8B) is over it, the built-in policy far under it.
LORA_FROM_PARAMETERS = 300_000_000


def resolved_adapter(adapter: str, model) -> str:
    """What a fine-tune of `model` with FineTuneConfig.adapter `adapter` trains: full or lora."""
    if adapter != "auto":
        return adapter
    if is_adapter(model):
        return "lora"  # an adapter version goes on training its adapter over the same base
    return "lora" if sum(p.numel() for p in model.parameters()) >= LORA_FROM_PARAMETERS else "full"


def lora_targets(model) -> list[str]:
    """Names of the nn.Linear modules inside the model's decoder layers (its longest ModuleList): the attention and MLP
    projections, never the LM head or the embeddings."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    layers = max(lists, key=len, default=[])
    names = sorted({name.rsplit(".", 1)[-1] for layer in layers for name, m in layer.named_modules()
                    if isinstance(m, torch.nn.Linear)})
    if not names:
        raise ValueError(f"found no nn.Linear inside the decoder layers of {type(model).__name__}: set "
                         "lora_target_modules")
    return names


def lora_config(cfg, model):
    """The peft LoraConfig of FineTuneConfig `cfg`'s LoRA settings for `model`."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_scale_alpha, lora_dropout=cfg.lora_dropout,
                      use_dora=cfg.lora_dora, target_modules=list(cfg.lora_target_modules or lora_targets(model)),
                      task_type="CAUSAL_LM")


@contextlib.contextmanager
def _quiet():
    """peft reads transformers' deprecated is_gradient_checkpointing whenever it wraps a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing", category=FutureWarning)
        yield


def _wrapped(model, config):
    from peft import get_peft_model

    with _quiet():
        return get_peft_model(model, config)


def shared_view(model):
    """A module tree of its own over `model`'s parameters and buffers: no weight is copied."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def plain_view(model):
    """The model under a PeftModel's adapters, as a view without them (the adapted model is left as it is)."""
    view = shared_view(model).unload()
    view.__dict__.pop("peft_config", None)  # peft's note on the model it wrapped: a fresh wrap starts clean
    return view


def adapter_clone(model):
    """A trainable copy of a PeftModel's active adapter, named "default" (TRL's DPO reference copies that name), over
    a view of the same base."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    name = model.active_adapter
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = False
    clone = _wrapped(plain_view(model), config)
    set_peft_model_state_dict(clone, get_peft_model_state_dict(model, adapter_name=name))
    clone.generation_config = copy.deepcopy(model.generation_config)
    return clone.eval()


def merged_copy(model):
    """A trainable full model with a PeftModel's active adapter merged in; the base it was over stays untouched."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    name = model.active_adapter
    full = copy.deepcopy(plain_view(model))  # a real copy of the base this time: merging writes into its weights
    wrapped = _wrapped(full, copy.deepcopy(model.peft_config[name]))
    set_peft_model_state_dict(wrapped, get_peft_model_state_dict(model, adapter_name=name))
    return wrapped.merge_and_unload().requires_grad_(True).eval()


# ---- saving and loading ----

def save_adapter(model, folder: Path, base_path: str | Path, base_sha256: str) -> None:
    """Write the active adapter of `model` and base.json into `folder` (no base weights)."""
    name = model.active_adapter
    model.save_pretrained(folder, selected_adapters=[name], save_embedding_layers=False)
    if name != "default":  # peft writes any other adapter into a subfolder named after it
        for path in (folder / name).iterdir():
            path.rename(folder / path.name)
        (folder / name).rmdir()
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card: not needed to load the adapter
    (folder / BASE_FILE).write_text(json.dumps({"path": str(Path(base_path).resolve()), "sha256": base_sha256},
                                               indent=2))


class _Bases:
    """The base of the adapter versions a process loads: read from disk once per hash, then shared through views."""

    def __init__(self):
        self.held: tuple | None = None  # ((sha256, device, dtype), model, tokenizer)
        self.loads = 0  # bases read from disk in this process

    def get(self, base: dict, device: str, dtype: str):
        key = (base["sha256"], str(device), dtype)
        if self.held is None or self.held[0] != key:
            model, tokenizer = load_policy(base["path"], device, dtype)
            model.requires_grad_(False)
            self.held = (key, model, tokenizer)
            self.loads += 1
        return self.held[1], self.held[2]

    def adopt(self, sha256: str, device: str, dtype: str, model, tokenizer) -> None:
        """A full model already in memory whose folder is this base (a worker holding the version that the new adapter
        versions are over): used in place of a second copy."""
        self.held = ((sha256, str(device), dtype), model, tokenizer)


BASES = _Bases()


def load_adapter_policy(folder: str | Path, version: str, device: str = "cpu", dtype: str = "float32") -> Policy:
    """An adapter version over its (checked) base, as the Policy search runs; the adapter is named after the version."""
    from peft import PeftModel

    base, tokenizer = BASES.get(checked_base(folder, version), device, dtype)
    try:
        with _quiet():
            model = PeftModel.from_pretrained(shared_view(base), folder, adapter_name=version, is_trainable=False)
    except Exception as exc:  # peft raises many types; the user needs one clear line
        raise PolicyLoadError(f"{folder} could not be loaded as a LoRA adapter: {type(exc).__name__}: {exc}") from exc
    memory = RecyclingMemory.load(folder, model.config.vocab_size, device=base.device)
    return Policy(model.eval(), tokenizer, version, str(folder), memory, PromptFormat.load(folder))


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _adapter_tensors(model) -> dict:
    """The active adapter's weight tensors, keyed as its saved file keys them (the adapter's name left out). Found
    once per adapter and kept on the model: an in-place swap writes into the same tensors, and walking the modules
    (peft's get_peft_model_state_dict, twice a swap) was most of a swap's 14 ms on a 21M Llama."""
    name = model.active_adapter
    held = model.__dict__.get("_arbor_adapter_tensors")
    if held is None or held[0] != name:
        tag = f".{name}."
        tensors = {key.replace(tag, "."): param for key, param in model.named_parameters()
                   if tag in key and (".lora_A." in key or ".lora_B." in key)}
        # DoRA's magnitudes: parameter `...lora_magnitude_vector.<name>.weight`, saved as `...lora_magnitude_vector`
        magnitude = f".lora_magnitude_vector.{name}.weight"
        tensors.update({key.removesuffix(magnitude) + ".lora_magnitude_vector": param
                        for key, param in model.named_parameters() if key.endswith(magnitude)})
        held = (name, tensors)
        model.__dict__["_arbor_adapter_tensors"] = held
    return held[1]


def _same_shape_weights(model, folder: Path) -> dict | None:
    """The adapter weights of `folder`, keyed as _adapter_tensors keys the active adapter's, when that adapter has the
    same LoRA settings and tensor shapes (a later version of one lineage); None when it does not."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    held = model.peft_config[model.active_adapter]
    given = PeftConfig.from_pretrained(folder)
    settings = ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "bias", "modules_to_save")
    if any(getattr(held, s, None) != getattr(given, s, None) for s in settings):
        return None
    live = _adapter_tensors(model)
    new = load_file(folder / ADAPTER_WEIGHTS)
    if not live or new.keys() != live.keys() or any(new[k].shape != live[k].shape for k in live):
        return None
    return new


def _copy_adapter_in_place(model, folder: Path) -> bool:
    """Switch to `folder`'s adapter by writing its weights into the active adapter's tensors. peft's load_adapter
    builds and injects a new module pair in every adapted layer, a cost per layer that does not shrink with the
    model: measured on a 21M Llama (42 adapted layers), 0.106 s a swap against 0.054 s to reload the whole model;
    this copy, with the adapter's tensors found once (_adapter_tensors), swaps in 2.2 ms against a 24 ms reload
    (docs/benchmarks.md). Every weight is read and checked before any
    is written, so a failure leaves the model as it was. False when the shapes or settings differ."""
    new = _same_shape_weights(model, Path(folder))
    if new is None:
        return False
    with torch.no_grad():
        for key, tensor in _adapter_tensors(model).items():
            tensor.copy_(new[key])
    return True


def swap_adapter(policy: Policy, folder: str | Path, version: str) -> Policy:
    """`policy`'s model with the adapter of `folder` (a version over the same base) in place of its own: only the
    adapter is read, and written into the held adapter's tensors where its shapes match. If it fails, the old
    adapter stays active and the model is as it was."""
    model, old = policy.model, policy.model.active_adapter
    try:
        if _copy_adapter_in_place(model, Path(folder)):
            memory = RecyclingMemory.load(folder, model.config.vocab_size, device=model.device)
            # eval() walks every module (4 ms a swap on a 21M Llama); a served model is already in eval mode
            return Policy(model.eval() if model.training else model, policy.tokenizer, version, str(folder), memory, PromptFormat.load(folder))
    except Exception as exc:
        raise PolicyLoadError(f"{folder} could not be loaded as a LoRA adapter: {type(exc).__name__}: {exc}") from exc
    try:
        if version in model.peft_config:  # left by an earlier failed swap
            model.delete_adapter(version)
        with _quiet():
            model.load_adapter(folder, adapter_name=version, is_trainable=False)
        model.set_adapter(version, inference_mode=True)
    except Exception as exc:
        if version in model.peft_config:
            model.set_adapter(old, inference_mode=True)
            model.delete_adapter(version)
        raise PolicyLoadError(f"{folder} could not be loaded as a LoRA adapter: {type(exc).__name__}: {exc}") from exc
    model.delete_adapter(old)
    memory = RecyclingMemory.load(folder, model.config.vocab_size, device=model.device)
    return Policy(model.eval(), policy.tokenizer, version, str(folder), memory, PromptFormat.load(folder))
