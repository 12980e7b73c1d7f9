"""Every configuration dataclass of agent/, in one module that imports no torch: the CLI builds its options from
these fields (default and help written once), and a run's settings are stored and restored from them.

Configs of the layers below and above live with their layer: SearchConfig (search/config.py), ContextMemoryConfig
(memory/context.py), QueueConfig (workers/config.py), ApiConfig (arbor/api). docs/architecture.md lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from search.config import SearchConfig
from search.prompt_format import RAW, PromptFormat, chosen

ADAPTERS = ("auto", "full", "lora")


@dataclass
class FineTuneConfig:
    """What every time-bounded fine-tune shares: it stops at its wall-clock budget or its step bound, whichever
    comes first (a step bound makes a fine-tune reproducible across machines; the time budget alone does not)."""

    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=64, metadata={"help": "examples per step"})
    time_budget_s: float = field(default=60.0, metadata={"help": "wall-clock limit of one fine-tune, seconds"})
    max_steps: int = field(default=100_000, metadata={
        "help": "optimizer steps at most (whichever of this and time_budget_s comes first ends the fine-tune)"})
    max_length: int = field(default=512, metadata={"help": "longest training sequence, in tokens"})
    seed: int = field(default=0, metadata={"help": "training seed"})
    # a version of a 0.5B-8B model is then tens of MB of adapter over a fixed base, and a worker switches versions by
    # swapping adapters (docs/models.md)
    adapter: str = field(default="auto", metadata={
        "help": "full (every parameter trains; a version is a whole model), lora (low-rank adapters over a fixed "
                "base train; a version is the adapter) or auto (lora for a model of 300M parameters or more, so the "
                "built-in policy trains full; docs/models.md)"})
    lora_rank: int = field(default=16, metadata={"help": "lora: rank of each low-rank update"})
    # a fixed alpha makes the update's scale grow as the rank shrinks: at rank 4 and alpha 32 (scale 8) the adapters of
    # a 21M Llama at 10x the rate stalled at loss 2.3 in 126 steps, at alpha 8 they reached 1.0 in 60 (docs/models.md)
    lora_alpha: int | None = field(default=None, metadata={
        "help": "lora: updates are scaled by lora_alpha / lora_rank (unset: twice the rank, a scale of 2)"})
    # without dropout a 21M Llama's rank-4 adapters took 27% more steps in one 120 s fine-tune and learned more, but in
    # the loop (64 problems a cycle, 10x the rate) they stalled at loss 1.0 where 0.05 reached 0.46 (docs/models.md)
    lora_dropout: float = field(default=0.05, metadata={"help": "lora: dropout on the adapters' inputs in training"})
    lora_dora: bool = field(default=False, metadata={
        "help": "lora: DoRA, a trained magnitude per output row beside the low-rank direction update (closer to full "
                "fine-tuning per step; a version is about 14% larger and decodes about 2x slower unmerged; "
                "docs/models.md)"})
    # LoRA+ with A at 2.5x full fine-tuning's rate and B at 20x: in bench/adapters.py's loop 103% of full fine-tuning's
    # held-out gain, where one rate for both at 10x reached 88% (docs/benchmarks.md)
    lora_plus_ratio: float = field(default=8.0, metadata={
        "help": "lora: LoRA+, the B matrices train at this many times the A matrices' rate (1: one rate for both)"})
    lora_learning_rate_scale: float = field(default=2.5, metadata={
        "help": "lora: the adapters (their A matrices, under LoRA+) train at learning_rate times this (they start at "
                "zero and are few: at the full rate they barely move; docs/models.md)"})
    lora_target_modules: tuple[str, ...] | None = field(default=None, metadata={
        "help": "lora: names of the linear layers that get adapters (unset: every nn.Linear inside the model's "
                "decoder layers, e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj for Llama; never "
                "the LM head or embeddings)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass: far less activation memory for one more forward per "
                "step"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step: each step still sees batch_size examples, this many at a time "
                "fewer"})

    @property
    def lora_scale_alpha(self) -> int:
        """lora_alpha, or twice the rank when unset."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def __post_init__(self):
        name = type(self).__name__
        if self.time_budget_s <= 0 and self.max_steps <= 0:
            raise ValueError(f"{name}: a fine-tune needs a positive time_budget_s or max_steps")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"{name}: adapter must be one of {', '.join(ADAPTERS)} (got {self.adapter!r})")
        if self.lora_rank < 1 or (self.lora_alpha is not None and self.lora_alpha <= 0):
            raise ValueError(f"{name}: lora_rank must be at least 1 and lora_alpha positive (got {self.lora_rank}, "
                             f"{self.lora_alpha})")
        if not self.lora_plus_ratio >= 1.0:
            raise ValueError(f"{name}: lora_plus_ratio must be 1 or more (got {self.lora_plus_ratio})")
        if not self.lora_learning_rate_scale > 0:
            raise ValueError(f"{name}: lora_learning_rate_scale must be positive (got {self.lora_learning_rate_scale})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{name}: lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.lora_target_modules is not None:
            # a config restored from JSON holds a list
            self.lora_target_modules = tuple(self.lora_target_modules)
            if not self.lora_target_modules or not all(isinstance(m, str) and m for m in self.lora_target_modules):
                raise ValueError(f"{name}: lora_target_modules must name at least one module, or be unset")
        if not 1 <= self.gradient_accumulation_steps <= max(1, self.batch_size):
            raise ValueError(f"{name}: gradient_accumulation_steps must be between 1 and batch_size "
                             f"(got {self.gradient_accumulation_steps})")


@dataclass
class TrainConfig(FineTuneConfig):
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (unset: where the hardware supports it)"})
    schedule: str = field(default="constant", metadata={
        "help": "constant or time_cosine (warm-up and cosine decay over the time budget)"})


@dataclass
class PreferenceConfig(FineTuneConfig):
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the preference fine-tune"})
    batch_size: int = field(default=32, metadata={"help": "preference pairs per step"})
    time_budget_s: float = field(default=15.0, metadata={
        "help": "wall-clock limit of one preference fine-tune, seconds"})
    beta: float = field(default=0.1, metadata={"help": "DPO beta: how far the policy may move from the reference"})
    max_pairs: int = field(default=2000, metadata={"help": "pairs per cycle at most (the most confident mistakes)"})

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be positive (got {self.beta})")


@dataclass
class SelectConfig:
    mode: str = field(default="label_free", metadata={
        "help": "label_free (answers never used) or verifier (train on verified answers)"})
    min_vote_share: float = field(default=0.75, metadata={
        "help": "label_free: least share of the candidates that must agree on the chosen answer"})
    min_confidence: float | None = field(default=None, metadata={
        "help": "least mean token log-prob of the chosen candidate (unset: filter off)"})
    use_task_filters: bool = field(default=True, metadata={"help": "apply the task's own label checks"})
    # off by default: checking every sampled answer kept a little more (0.68 -> 0.72 at 5 digits) but let correlated
    # mistakes through (split's precision in the loop 0.96-0.99, against 0.99-1.00 for the majority answer alone)
    checked_min_share: float | None = field(default=None, metadata={
        "help": "label_free, tasks with label checks or a min_value: every answer with at least this support goes to "
                "the checks, most supported first, and the first that passes all of them is the label (unset: the "
                "majority answer only, when it reaches min_vote_share)"})
    calibration_quantile: float | None = field(default=0.1, metadata={
        "help": "label_free, tasks without label checks: keep a label only if its confidence reaches this quantile of "
                "the policy's greedy confidence on difficulties it has mastered (unset: filter off)"})
    # agreeing answers label only what the policy already solves; what it gets wrong is what it must learn
    use_task_proposals: bool = field(default=True, metadata={
        "help": "label_free, tasks with label proposals (decompositions): a problem the filters dropped is labelled "
                "with the answer all of the task's proposals agree on"})
    # a decomposition repeats its parts' mistakes: trusted parts as they are gave labels 0.92-0.985 right at 30-90
    # digits; checked all the way down, slower runs; trusted parts checked once 1.000 (docs/benchmarks.md)
    verify_proposal_parts: bool = field(default=True, metadata={
        "help": "label_free: a proposal uses a part's answer only where it passes the task's label checks: at the "
                "lengths trusted by proposal_mastery one level deep, past them with its own parts checked alike (off: "
                "trusted parts as they are, no others)"})
    proposal_mastery: float | None = field(default=0.98, metadata={
        "help": "label_free: difficulties whose gate metric reaches this, from the easiest up, are trusted in label "
                "proposals (unset: none; with verify_proposal_parts every part is checked all the way down)"})
    min_value: float | None = field(default=None, metadata={
        "help": "label_free: keep a label only if the current version's value model gives it at least this "
                "probability of being right (needs --value-model; unset: filter off)"})
    given_answers: bool = field(default=True, metadata={
        "help": "verifier: a problem none of whose candidates verified trains on its own answer (exact checker only)"})

    def __post_init__(self):
        if self.mode not in ("label_free", "verifier"):
            raise ValueError(f"selection mode must be 'label_free' or 'verifier' (got {self.mode!r})")


@dataclass
class BuiltinConfig:
    """Shape of the built-in policy; 1.06M parameters at these defaults."""

    hidden_size: int = field(default=128, metadata={"help": "width of the residual stream"})
    intermediate_size: int = field(default=512, metadata={"help": "width of the MLP"})
    num_layers: int = field(default=4, metadata={"help": "transformer layers"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    max_positions: int = field(default=512, metadata={"help": "longest sequence, in tokens"})
    position_scheme: str = field(default="coupled", metadata={
        "help": "coupled (digit positions aligned across operands, for arithmetic) or sequential"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights"})


@dataclass
class RegistryConfig:
    keep_rejected: int = field(default=3, metadata={
        "help": "rejected versions whose folders are kept (the newest ones); older rejected folders are deleted, "
                "their records kept"})


@dataclass
class WarmStartConfig:
    difficulties: tuple[int, ...] = field(default=(1, 2, 3, 4), metadata={
        "help": "difficulties the built-in task is warm-started on"})
    examples_per_difficulty: int = field(default=3000, metadata={
        "help": "warm-start examples per difficulty, times the difficulty (longer problems have more to learn)"})
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(learning_rate=3e-3, time_budget_s=180.0, schedule="time_cosine"),
        metadata={"help": "the warm start's fine-tune"})
    # a time-bounded fine-tune sometimes ends before the policy masters its own lengths (one seed stopped at
    # 0.88 / 0.84 / 0.74 at 2 / 3 / 4 digits, where four others reached 1.00), and every self-trained length builds
    # on them: a 60 s extension at a third of the rate took that policy to 1.00 / 0.97 / 0.91
    mastery: float | None = field(default=0.95, metadata={
        "help": "built-in tasks: greedy accuracy on fresh problems of every warm-start difficulty that ends the warm "
                "start; short of it, the fine-tune is extended (unset: no check)"})
    extensions: int = field(default=3, metadata={
        "help": "extensions at most, each a third of the fine-tune's time and steps"})
    check_problems: int = field(default=100, metadata={"help": "problems per difficulty of the mastery check"})

    def __post_init__(self):
        if self.train.adapter == "auto":
            self.train = replace(self.train, adapter="full")
        if self.train.adapter != "full":
            raise ValueError("warm_start.train.adapter must be 'full': a first version has no earlier version to be an "
                             "adapter over (the cycles after it may train lora)")

    def extension(self) -> TrainConfig:
        """One extension: a third of the warm start's time and steps, at a third of its learning rate (refine, not
        relearn)."""
        t = self.train
        return replace(t, learning_rate=t.learning_rate / 3, time_budget_s=t.time_budget_s / 3,
                       max_steps=max(1, t.max_steps // 3))


TRAIN_METHODS = ("sft", "dpo", "sft+dpo")


@dataclass
class ValueConfig:
    layers: tuple[int, ...] = field(default=(-1,), metadata={
        "help": "which of the trunk's hidden states the head reads (indices into hidden_states; -1 the last)"})
    trunk: str = field(default="tuned", metadata={
        "help": "tuned: a copy of the policy's weights trained with the head (one more forward per scoring; the one "
                "that learned to judge: docs/search.md); frozen: a head over the policy's own trunk (no second model)"})
    confidence_features: bool = field(default=True, metadata={
        "help": "the head also reads the policy's token log-probs and entropies along the path"})
    hidden: int = field(default=0, metadata={
        "help": "width of the head's hidden layer (0: a linear head, which generalised best to held-out problems)"})
    trunk_learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate of a tuned trunk"})
    trunk_batch: int = field(default=64, metadata={"help": "completions per optimizer step of a tuned trunk"})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the head"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=15, metadata={
        "help": "passes over the labelled prefixes (more fit the train problems and lose on held-out ones)"})
    batch_size: int = field(default=256, metadata={"help": "prefixes per optimizer step (frozen trunk)"})
    time_budget_s: float = field(default=240.0, metadata={"help": "wall-clock limit of the value model's training"})
    max_rows: int = field(default=256, metadata={"help": "sequences per trunk forward"})
    seed: int = field(default=0, metadata={"help": "seed of the head's weights and batch order"})

    def __post_init__(self):
        self.layers = tuple(self.layers)
        if not self.layers or not all(isinstance(i, int) for i in self.layers):
            raise ValueError(f"layers must be hidden-state indices such as (-1,) (got {self.layers!r})")
        if self.trunk not in ("frozen", "tuned"):
            raise ValueError(f"trunk must be 'frozen' or 'tuned' (got {self.trunk!r})")
        if self.hidden < 0 or self.epochs < 1 or self.batch_size < 1 or self.max_rows < 1:
            raise ValueError("hidden must be >= 0 and epochs, batch_size, max_rows at least 1")
        if not (self.learning_rate > 0 and self.time_budget_s > 0):
            raise ValueError("learning_rate and time_budget_s must be positive")


@dataclass
class LoopConfig:
    cycles: int = field(default=30, metadata={"help": "self-training cycles after the warm start"})
    time_budget_s: float | None = field(default=None, metadata={
        "help": "stop starting cycles after this many seconds (warm start included)"})
    # search is cheap next to training: more problems, more distinct labels
    problems_per_cycle: int = field(default=3000, metadata={"help": "problems searched per cycle"})
    # a search's cost grows with the answers' length: past the lengths where labels are scarce, fewer problems
    # give enough labels for the mix (each cycle draws 2800 of its newest) at a fraction of the search and checks
    answer_tokens_per_cycle: int | None = field(default=45_000, metadata={
        "help": "built-in tasks: at most this many problems x answer tokens (max_new_tokens) a cycle: 3000 "
                "problems up to 12 digits, 1000 at 40 (unset: always problems_per_cycle)"})
    # labels one or two lengths ahead stay exact under the decomposition check and teach longer lengths sooner
    frontier_spread: tuple[float, ...] = field(default=(0.5, 0.3, 0.2), metadata={
        "help": "share of each cycle's problems at the frontier and at the difficulties past it (frontier_stride "
                "apart)"})
    # a mastered length generalises a few lengths past itself, more so the longer it is: labels further ahead
    # teach longer lengths sooner, and the decomposition check keeps them exact while the halves are mastered
    frontier_stride: float = field(default=0.2, metadata={
        "help": "spacing of the difficulties past the frontier, as a share of the frontier's (at least one apart)"})
    # label-free labels exist only where the policy is already sometimes right
    min_label_yield: float | None = field(default=0.1, metadata={
        "help": "label_free without label proposals: a difficulty past the frontier is trained on only where the "
                "current policy's self-verified rate reaches this; a share aimed further falls back to the "
                "furthest one that does (unset: no fallback)"})
    heldout_per_difficulty: int = field(default=100, metadata={
        "help": "held-out problems per difficulty (built-in task)"})
    report_difficulties: tuple[int, ...] = field(default=(4, 8, 12, 16, 20, 24, 32, 40, 60, 80, 100), metadata={
        "help": "difficulties always evaluated for the report; the longest is also how far the curriculum trains and "
                "evaluates ahead of a frontier below it"})
    # a report's difficulties far past the frontier score 0 for most of a run, and their long answers made up most
    # of an evaluation's decoding: a sample tells the report as much there
    heldout_past_window: int | None = field(default=25, metadata={
        "help": "report difficulties past the evaluated window around the frontier are scored on this many of their "
                "held-out problems (unset: all); the window and everything below it always use all"})
    # the window spans 40% of the frontier past it (17 lengths at 84 digits), all decoded in full every cycle: past the
    # frontier's next three, 25 problems a length took 34-69% off a late cycle's evaluation (docs/benchmarks.md)
    full_heldout_ahead: int | None = field(default=3, metadata={
        "help": "window difficulties more than this many past the frontier are scored on heldout_past_window of "
                "their held-out problems, as the report's difficulties past the window are (unset: all of them)"})
    # lengths new to the moving window, decoded in full a second time for the current policy: 40% of a late evaluation
    gate_current_sample: int | None = field(default=25, metadata={
        "help": "the gate scores the current policy at lengths it was not evaluated at on this many of their held-out "
                "problems (unset: all); the candidate is scored on all"})
    eval_ahead: int = field(default=3, metadata={
        "help": "also evaluate this many difficulties past the frontier (at least as far as the cycle trains)"})
    # 160-digit addition (prompt, answer and end: 485 tokens) still fits the built-in policy's 512 positions and a
    # fine-tune's 512-token sequences
    max_difficulty: int = field(default=160, metadata={"help": "hardest difficulty the curriculum reaches"})
    threshold: float = field(default=0.9, metadata={"help": "held-out metric at which a difficulty counts as mastered"})
    promote_margin: float = field(default=0.0, metadata={
        "help": "a candidate must beat the current policy on held-out problems by more than this"})
    # a file task whose answers teach lengths the policy cannot do yet: each 50 s fine-tune from the current policy
    # moved them too little to pass the gate, and the next cycle threw it away and trained the same 50 s again
    continue_rejected: bool = field(default=True, metadata={
        "help": "verifier mode: a rejected candidate's fine-tune goes on in the next cycle instead of starting again "
                "from the current policy (its labels are right; the gate still decides promotion)"})
    # the recorded headline runs never had two rejections in a row; runs that had stopped learning (file tasks
    # label-free, or with labels the policy could not fit) repeated the same rejected cycle 4-18 times until the budget
    stop_after_rejections: int = field(default=3, metadata={
        "help": "end the run once this many candidates in a row fail the gate, saying which lengths fell (0: never)"})
    examples_per_cycle: int = field(default=8000, metadata={"help": "training mix size (replay included)"})
    replay_seed_fraction: float = field(default=0.3, metadata={"help": "warm-start (true-labelled) data in every mix"})
    replay_newest_fraction: float = field(default=0.35, metadata={
        "help": "this cycle's labels in the mix; the rest are earlier cycles' labels"})
    # learned from the search's own siblings, so that a refinement job's rounds are trained on before they must succeed
    replay_refine_fraction: float = field(default=0.05, metadata={
        "help": "refinement examples (this cycle's wrong candidates and their verdicts, completed by the label) in "
                "the mix, taken from the newest labels' share; none for a policy shown no history (position-coupled)"})
    search: SearchConfig = field(default_factory=lambda: SearchConfig(strategy="best_of_n", n=4, temperature=1.0),
                                 metadata={"help": "the search that finds each cycle's trajectories"})
    eval_search: SearchConfig = field(default_factory=lambda: SearchConfig(strategy="greedy"),
                                      metadata={"help": "the search of the held-out evaluation"})
    select: SelectConfig = field(default_factory=SelectConfig, metadata={"help": "which trajectories become labels"})
    # a constant rate, not warm-up and cosine decay: on addition the cosine schedule was never slower (the slow seed
    # 1,187 s against 1,601 s to 40 digits), but on reversal it settled the weights until no 11-letter answer was even
    # well formed and the run stalled, where the constant rate reached 40 letters in 875 s (docs/benchmarks.md)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=5e-4, time_budget_s=50.0),
                               metadata={"help": "each cycle's fine-tune"})
    train_method: str = field(default="sft", metadata={
        "help": "sft (the replay mix), dpo (this cycle's preference pairs) or sft+dpo (DPO after SFT, on the same "
                "candidate)"})
    preference: PreferenceConfig = field(default_factory=PreferenceConfig, metadata={
        "help": "each cycle's preference fine-tune (train_method dpo or sft+dpo; an sft+dpo cycle without pairs gives "
                "its time to SFT)"})
    # a judge that lives with the policy (agent/value_cycle.py): trained on each cycle's labels, promoted with it
    value_model: bool = field(default=False, metadata={
        "help": "train a value model every cycle and keep it beside the version (the 'value' scorer, and adaptive "
                "search as queue jobs' default once one is calibrated)"})
    value: ValueConfig = field(default_factory=lambda: ValueConfig(time_budget_s=30.0), metadata={
        "help": "each cycle's value-model training (a tuned trunk continues from the current version's)"})
    value_replay_fraction: float = field(default=0.5, metadata={
        "help": "earlier cycles' labelled candidates in the value model's data, as a share of this cycle's"})
    # a judge's training pays only where it moves the judge: measured on addition, 30 s a cycle left judges at AUROC
    # 0.42-0.59 on the next versions' samples past 9 digits (docs/search.md)
    value_refresh_auroc: float = field(default=0.9, metadata={
        "help": "a promoted candidate keeps the current version's value model (recalibrated, not trained) while it "
                "tells this cycle's right candidates from wrong at this AUROC or more (1: train every cycle)"})
    # 0.65, not 0.6: on addition the 6 judges retrained at 0.60-0.63 (3 seeds) scored 0.41-0.79 on held-out greedy
    # answers after their 30 s and 0.49-0.63 on the next cycle's samples, no better than the judge they replaced
    value_learning_auroc: float = field(default=0.65, metadata={
        "help": "a promoted candidate also keeps the current version's value model while it tells this cycle's right "
                "candidates from wrong at less than this AUROC: what it was taught does not carry to new candidates, "
                "and more of the same budget would not either"})
    value_demonstrations: int = field(default=256, metadata={
        "help": "label-free, tasks without label checks: demonstrations the value model learns from each cycle, "
                "against the policy's own different answers to them"})
    value_branches: int = field(default=2, metadata={
        "help": "... and per demonstration, answers that leave it at its least confident tokens (the likeliest "
                "mistakes)"})
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig, metadata={"help": "the warm start"})
    builtin: BuiltinConfig = field(default_factory=BuiltinConfig, metadata={"help": "shape of a new built-in policy"})
    seed: int = field(default=0, metadata={"help": "seed of problem generation and sampling"})
    prompt_format: str | None = field(default=None, metadata={
        "help": "how prompts are put to the policy in search, training and evaluation alike: raw, or chat (its "
                "tokenizer's chat template); stored with every version the run saves (unset: the base version's own, "
                "raw for a new one)"})
    system_prompt: str | None = field(default=None, metadata={"help": "chat: a system message before each prompt"})

    def __post_init__(self):
        self.chosen_prompt_format(RAW)  # ValueError names what is wrong
        if self.stop_after_rejections < 0:
            raise ValueError(f"stop_after_rejections must be 0 (never) or more (got {self.stop_after_rejections})")
        if not 0.5 <= self.value_learning_auroc <= self.value_refresh_auroc <= 1.0:
            raise ValueError("value_learning_auroc and value_refresh_auroc must satisfy 0.5 <= learning <= refresh <= 1 "
                             f"(got {self.value_learning_auroc} and {self.value_refresh_auroc})")
        if self.select.min_value is not None and not self.value_model:
            raise ValueError("select.min_value filters labels by the version's value model: turn on value_model "
                             "(--value-model) or leave min_value unset")
        if self.train_method not in TRAIN_METHODS:
            raise ValueError(f"train_method must be one of {', '.join(TRAIN_METHODS)} (got {self.train_method!r})")
        if self.train_method == "sft+dpo" and self.train.adapter != self.preference.adapter:
            # DPO continues SFT's candidate: a full SFT under a DPO adapter would be saved as an adapter over a base
            # whose weights it changed
            raise ValueError(f"train_method sft+dpo trains one candidate: train.adapter ({self.train.adapter}) and "
                             f"preference.adapter ({self.preference.adapter}) must match")

    def chosen_prompt_format(self, default: PromptFormat) -> PromptFormat:
        """The run's prompt format, or `default` (its base version's) when the run names none."""
        return chosen(self.prompt_format, self.system_prompt, default)

    def base_dtype(self, dtype: str) -> str:
        """The dtype a cycle loads the current policy in: a LoRA fine-tune leaves its base frozen, so the base may sit
        in `dtype` (Settings.dtype; bfloat16 halves an 8B base on one GPU, the adapters train in float32); a full
        fine-tune trains every weight, in float32."""
        # auto: a model that trains full copies its weights into a float32 candidate (trainer.clone_for_training)
        lora = (self.preference if self.train_method == "dpo" else self.train).adapter in ("lora", "auto")
        return dtype if lora else "float32"
