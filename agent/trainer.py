"""Fine-tuning with TRL: SFTTrainer on prompt-completion pairs (loss on the completion only) and DPOTrainer on
preference pairs (agent/preference.py), of every parameter or (FineTuneConfig.adapter "lora") of LoRA adapters over
frozen weights (agent/adapters.py).

A fresh trainer per cycle, bounded by wall-clock time rather than epochs so that a cycle's cost is
predictable on a CPU. The number of steps is not known ahead, so TRL's scheduler keeps the rate constant and a
schedule over time (TrainConfig.schedule "time_cosine": warm-up, then cosine decay) is applied by _TimeBudget.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import replace

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from agent import process_group
from agent.adapters import adapter_clone, is_adapter, lora_config, merged_copy, resolved_adapter, shared_view
from agent.config import FineTuneConfig, PreferenceConfig, TrainConfig


class _TimeBudget(TrainerCallback):
    """Stops training once the time budget is spent and, optionally, anneals the learning rate over *time*
    (linear warm-up, cosine decay to 10%): the step count of a time-bounded run is not known in advance."""

    def __init__(self, seconds: float, max_steps: int, cosine: bool, warmup_fraction: float = 0.05):
        self.seconds, self.max_steps, self.cosine, self.warmup = seconds, max_steps, cosine, warmup_fraction
        self.start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if not self.cosine or optimizer is None:
            return
        # progress through whichever bound ends the run first: time or steps
        progress = min(1.0, max((time.monotonic() - self.start) / self.seconds, state.global_step / self.max_steps))
        if progress < self.warmup:
            scale = max(progress / self.warmup, 0.01)
        else:
            scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (progress - self.warmup) / (1 - self.warmup)))
        for group in optimizer.param_groups:  # each group's own rate (LoRA+ trains B faster than A)
            group["lr"] = group.setdefault("arbor_base_lr", group["lr"]) * scale

    def on_step_end(self, args, state, control, **kwargs):
        if process_group.agree(time.monotonic() - self.start >= self.seconds):
            control.should_training_stop = True


def _peft_config(cfg: FineTuneConfig, model):
    """TRL's peft_config: a new LoRA adapter (adapter "lora" on a plain model), or None. A PeftModel keeps training
    its own adapter (TRL refuses a second one)."""
    adapter = resolved_adapter(cfg.adapter, model)
    if is_adapter(model):
        if adapter != "lora":
            raise ValueError("a LoRA adapter version trains its adapter: copy it with clone_for_training(model, 'full') "
                             "for a full fine-tune")
        model.set_adapter(model.active_adapter)  # trainable again if it was loaded for inference
        return None
    return lora_config(cfg, model) if adapter == "lora" else None


def _at_adapter_rate(cfg: FineTuneConfig, model):
    """`cfg` with the learning rate of what trains: a LoRA fine-tune's is lora_learning_rate_scale times the full
    rate (the adapters start at zero and are a small share of the weights: at one full rate, 60 steps on a 1.9M
    model reached held-out 0.04 against full fine-tuning's 0.69, at ten times 0.37 at rank 4 and 0.56 at rank 16)."""
    if resolved_adapter(cfg.adapter, model) != "lora":
        return cfg
    return replace(cfg, learning_rate=cfg.learning_rate * cfg.lora_learning_rate_scale)


def _lora_plus(trainer, cfg: FineTuneConfig) -> None:
    """LoRA+ (Hayou et al., 2024): the adapters' B matrices (and DoRA's magnitudes) train at lora_plus_ratio times
    the rate of their A matrices. B starts at zero and A at random, so at one shared rate B's updates are too small
    for the adapter to move its features far in a short fine-tune. Set on the trainer before it builds its own."""
    if cfg.lora_plus_ratio == 1.0 or not is_adapter(trainer.model):
        return
    from peft.optimizers import create_loraplus_optimizer

    trainer.optimizer = create_loraplus_optimizer(trainer.model, torch.optim.AdamW, lr=cfg.learning_rate,
                                                  loraplus_lr_ratio=cfg.lora_plus_ratio,
                                                  loraplus_weight_decay=getattr(cfg, "weight_decay", 0.0))


def _settled(model):
    """The trained model, plain again: TRL patches `forward` (a fused LM head; under a PeftModel, on its base) with a
    closure over the *original* bound forward, and a later copy of the model would keep calling the original's
    weights. TRL's DPO reference adapter goes too, so that a saved version holds the trained adapter only."""
    for m in (model, model.get_base_model()) if is_adapter(model) else (model,):
        m.__dict__.pop("forward", None)
    if is_adapter(model) and "ref" in model.peft_config:
        model.delete_adapter("ref")
    return model.eval()


def _micro_batch(cfg: FineTuneConfig, processes: int = 1) -> int:
    """Examples per forward: batch_size per optimizer step, over the processes and the accumulated micro-batches."""
    return max(1, cfg.batch_size // (processes * cfg.gradient_accumulation_steps))


@contextlib.contextmanager
def _deprecations_quiet():
    """TRL and peft call transformers' gradient_checkpointing names (deprecated for activation_checkpointing) when a
    trainer is built and on every step of a reference forward."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing", category=FutureWarning)
        yield


def _bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # CPU bf16 autocast measured 10x slower than fp32 on this 2-core machine (1.23 s vs 0.12 s a step of the
    # 1M policy at batch 64): without native bf16 units it is pure overhead
    return False


def _time_bounded_args(cfg, bf16: bool, use_cuda: bool) -> dict:
    """The TRL arguments SFT and DPO share: a run bounded by _TimeBudget and max_steps (the epochs never end it),
    constant learning rate (the step count is unknown ahead), nothing saved, reported or printed per step."""
    return dict(
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        num_train_epochs=1_000,
        max_steps=cfg.max_steps,
        max_length=cfg.max_length,
        bf16=bf16,
        use_cpu=not use_cuda,
        # TRL turns it on by default; off is 1.5x faster for tiny models (measured), on is what lets a large one fit
        activation_checkpointing=cfg.gradient_checkpointing,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        log_level="error",
        disable_tqdm=True,
        seed=cfg.seed,
        dataset_num_proc=None,
    )


def clone_for_training(model, adapter: str | None = None):
    """A copy for a candidate: same class, config and weights, nothing that its fine-tune changes shared with `model`,
    no patches. `adapter` is what the fine-tune will train (FineTuneConfig.adapter; None: what the model is). A LoRA
    candidate shares the frozen base weights with `model` (a second copy of an 8B base would not fit beside it on one
    GPU) and copies only the adapter; an adapter version trained "full" is merged into a copy of its base first."""
    if is_adapter(model):
        return merged_copy(model) if adapter == "full" else adapter_clone(model)
    if adapter == "lora":
        return shared_view(model).eval()  # TRL wraps it in a new adapter and freezes these shared weights
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    clone.generation_config = copy.deepcopy(model.generation_config)
    return clone.to(model.device, torch.float32).eval()  # every weight trains: in float32 even from a bf16 policy


class SFTFineTuner:
    """Fine-tunes a policy on prompt-completion examples and returns what happened. The model trains in place, except
    that adapter "lora" on a plain model wraps it in a new PeftModel: `trained` is the model that trained, either way."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.trained = None

    def train(self, model, tokenizer, examples: list[dict]) -> dict:
        from trl import SFTConfig, SFTTrainer

        if not examples:
            raise ValueError("nothing to train on: the selection kept no examples")
        cfg = _at_adapter_rate(self.cfg, model)
        use_cuda = torch.cuda.is_available() and model.device.type == "cuda"
        bf16 = _bf16_supported() if cfg.bf16 is None else cfg.bf16
        peft_config = _peft_config(cfg, model)
        dataset = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
        _quiet_libraries()
        with tempfile.TemporaryDirectory(prefix="arbor-sft-") as out, _deprecations_quiet():
            args = SFTConfig(
                output_dir=out,
                # the same examples per optimiser step however many processes share the fine-tune
                per_device_train_batch_size=_micro_batch(cfg, process_group.world_size()),
                weight_decay=cfg.weight_decay,
                **_time_bounded_args(cfg, bf16, use_cuda),
                completion_only_loss=True,
                # batches of similar length pad less: the replay mix spans 2- to 60-token examples
                train_sampling_strategy="group_by_length",
            )
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[
                    _TimeBudget(cfg.time_budget_s, cfg.max_steps, cfg.schedule == "time_cosine")
                ],
                peft_config=peft_config,
            )
            trainer.remove_callback(PrinterCallback)  # losses are kept in log_history, not printed per step
            _lora_plus(trainer, cfg)
            start = time.monotonic()
            result = trainer.train()
            seconds = time.monotonic() - start
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        self.trained = _settled(trainer.model)
        return {
            "train_loss": losses[-1] if losses else float(result.training_loss),
            "mean_loss": float(result.training_loss),
            "steps": int(trainer.state.global_step),
            "examples": len(examples),
            "seconds": round(seconds, 2),
            "processes": int(trainer.args.world_size),
        }


class DPOFineTuner:
    """Fine-tunes a policy with TRL's DPOTrainer on {"prompt", "chosen", "rejected"} pairs, against a frozen copy of
    itself as it was before this fine-tune. In place as SFTFineTuner, with `trained` the model that trained."""

    def __init__(self, cfg: PreferenceConfig):
        self.cfg = cfg
        self.trained = None

    def train(self, model, tokenizer, pairs: list[dict]) -> dict:
        from trl import DPOConfig, DPOTrainer

        if not pairs:
            raise ValueError("nothing to train on: no preference pairs")
        if process_group.world_size() > 1:
            # the other ranks of a launch join SFT fine-tunes only (agent/distributed.py follow)
            raise RuntimeError("a preference fine-tune runs in one process")
        cfg = _at_adapter_rate(self.cfg, model)
        use_cuda = torch.cuda.is_available() and model.device.type == "cuda"
        dataset = Dataset.from_list(
            [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
        )
        peft_config = _peft_config(cfg, model)
        if peft_config is not None or (is_adapter(model) and model.active_adapter == "default"):
            # TRL's reference is then the model with the new adapter off, or a frozen copy of its "default" adapter
            reference = None
        else:
            reference = clone_for_training(model)
            reference.requires_grad_(False)
        _quiet_libraries()
        with tempfile.TemporaryDirectory(prefix="arbor-dpo-") as out, _deprecations_quiet():
            args = DPOConfig(
                output_dir=out,
                per_device_train_batch_size=_micro_batch(cfg),
                beta=cfg.beta,
                # a frozen reference model of this size costs one extra forward a step; precomputing its
                # log-probs would spend the time budget on pairs the run may never reach
                precompute_ref_log_probs=False,
                **_time_bounded_args(cfg, _bf16_supported(), use_cuda),
            )
            trainer = DPOTrainer(
                model=model,
                ref_model=reference,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[_TimeBudget(cfg.time_budget_s, cfg.max_steps, cosine=False)],
                peft_config=peft_config,
            )
            trainer.remove_callback(PrinterCallback)
            _lora_plus(trainer, cfg)
            start = time.monotonic()
            result = trainer.train()
            seconds = time.monotonic() - start
            logs = [h for h in trainer.state.log_history if "loss" in h]
        self.trained = _settled(trainer.model)
        last = logs[-1] if logs else {}
        # TRL's rewards are beta-scaled log-ratios to the reference, logged every logging_steps
        rewards = {
            name: last[key]
            for name, key in (("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies"))
            if key in last
        }
        return {
            "train_loss": last.get("loss", float(result.training_loss)),
            "mean_loss": float(result.training_loss),
            **rewards,
            "steps": int(trainer.state.global_step),
            "pairs": len(pairs),
            "seconds": round(seconds, 2),
        }


def _quiet_libraries() -> None:
    """Per-map progress bars from datasets and transformers would drown Arbor's own progress display."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
