"""The policy: any local transformers causal LM, or the built-in tiny Llama-style model.

The built-in model is an ordinary causal LM to the rest of Arbor (input ids and an attention mask in,
logits out; `save_pretrained`, Auto classes, `generate`, TRL). For arithmetic it can use *position
coupling* (Cho et al. 2024) and a *coupled-causal mask*, both derived from its own input ids:

    a0 a1 .. a(d-1) + b0 b1 .. b(d-1) = s0 s1 .. sd <eos>      (digits least significant first)
    ids: 1  2 ..  d  d+1 1  2  ..  d   1  2  3 .. d+2

Digit i of both operands and the token that predicts answer digit i share one position id, and a query
with coupled id p may not see operand tokens whose id is above p. The same relative geometry holds at
every length, which is what lets a model trained on 1-4 digits add longer numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from memory.context import ContextMemory, check_model
from memory.recycling import RecyclingMemory
from search.decoder import float_mask, sequential_tree_inputs, tree_paths
from search.prompt_format import RAW, PromptFormat
from tasks.addition import COUPLING as ADDITION_COUPLING
from tasks.base import PositionCoupling

from agent.config import BuiltinConfig
from agent.settings import DTYPES

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
DEFAULT_CHARSET = "0123456789+-*/=()<>.,:;?!'\" \n#abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_|[]{}%&@$^~`\\"


class ArborConfig(LlamaConfig):
    """Llama plus position coupling (Cho et al. 2024). With `position_scheme="coupled"`, operand tokens
    (`digit_token_ids`: the task's operand alphabet) are numbered within their run, forward from its start or
    backward from its end (`operand_order`); the answer after the separator (`equals_token_id`) is numbered
    forward, so that the token predicting answer token i shares its position id with the operand tokens that
    answer token is made from. Addition counts forward (digit i of both operands and answer digit i); reversal
    counts backward (the word's last letter and the answer's first). Only the separator's own line holds operands
    (`line_break_token_id`): the digits of a refinement prompt's earlier attempts, on the lines above, are plain text
    (position 0, never masked), not more operands."""

    model_type = "arbor"

    def __init__(
        self,
        position_scheme: str = "sequential",
        digit_token_ids: list[int] | None = None,
        plus_token_id: int | None = None,
        equals_token_id: int | None = None,
        operand_order: str = "forward",
        line_break_token_id: int | None = None,
        **kwargs,
    ):
        if position_scheme not in ("sequential", "coupled"):
            raise ValueError(f"position_scheme must be 'sequential' or 'coupled' (got {position_scheme!r})")
        if operand_order not in ("forward", "backward"):
            raise ValueError(f"operand_order must be 'forward' or 'backward' (got {operand_order!r})")
        self.position_scheme = position_scheme
        self.digit_token_ids = list(digit_token_ids or [])
        self.plus_token_id = plus_token_id
        self.equals_token_id = equals_token_id
        self.operand_order = operand_order
        self.line_break_token_id = line_break_token_id
        super().__init__(**kwargs)


def coupled_positions(config: ArborConfig, input_ids: torch.Tensor, valid: torch.Tensor):
    """Coupled position ids and operand flags for a batch, vectorised over [B, T] (no Python loop over tokens).

    `valid` is 1 for real tokens, 0 for padding. Returns (position_ids [B, T], is_operand [B, T] bool).
    """
    B, T = input_ids.shape
    device = input_ids.device
    lut = torch.zeros(config.vocab_size, dtype=torch.bool, device=device)
    lut[torch.tensor(config.digit_token_ids, device=device)] = True
    is_digit = lut[input_ids] & valid.bool()
    is_eq = (input_ids == config.equals_token_id) & valid.bool()
    is_plus = (
        (input_ids == config.plus_token_id) if config.plus_token_id is not None else torch.zeros_like(is_eq)
    ) & valid.bool()
    real = valid.bool()
    t = torch.arange(T, device=device).expand(B, T)
    # tokens are counted among real ones only, so that a masked hole (a row that accepted fewer draft tokens than
    # its batch) places the tokens after it exactly as if it were not there
    count = real.long().cumsum(dim=1) - 1
    # raw index of the nearest real non-digit at or before t (-1 if none): digits count from there
    last_nondigit = torch.where(real & ~is_digit, t, torch.full_like(t, -1)).cummax(dim=1).values
    count_at_nondigit = torch.where(
        last_nondigit >= 0, count.gather(1, last_nondigit.clamp(min=0)), torch.full_like(t, -1)
    )
    run_index = count - count_at_nondigit - 1
    after_eq = is_eq.gather(1, last_nondigit.clamp(min=0)) & (last_nondigit >= 0)
    digit_pos = run_index + 1 + after_eq.long()
    if getattr(config, "operand_order", "forward") == "backward":
        # operand tokens count from the end of their run (its last token is 1): index of the next real non-operand
        # token at or after t (T if none), and the real-token count there
        next_nondigit = torch.where(real & ~is_digit, t, torch.full_like(t, T)).flip(1).cummin(dim=1).values.flip(1)
        total = real.long().sum(dim=1, keepdim=True).expand(B, T)
        count_at_next = torch.where(next_nondigit < T, count.gather(1, next_nondigit.clamp(max=T - 1)), total)
        digit_pos = torch.where(after_eq, digit_pos, count_at_next - count)
    pos = torch.zeros_like(t)
    pos = torch.where(is_digit, digit_pos, pos)
    pos = torch.where(is_eq, torch.ones_like(pos), pos)
    last_real = torch.where(real, t, torch.full_like(t, -1)).cummax(dim=1).values
    prev = torch.cat([torch.full_like(t[:, :1], -1), last_real[:, :-1]], dim=1)  # the real token before t
    prev_pos = pos.gather(1, prev.clamp(min=0))
    prev_digit = is_digit.gather(1, prev.clamp(min=0)) & (prev >= 0)
    pos = torch.where(is_plus, torch.where(prev_digit, prev_pos + 1, torch.ones_like(pos)), pos)
    before_eq = is_eq.long().cumsum(dim=1) == 0
    is_operand = before_eq & (is_digit | is_plus)
    break_id = getattr(config, "line_break_token_id", None)
    if break_id is not None:
        # operands lie on the separator's line (the last line while no separator is there yet): digits shown on earlier
        # lines (a refinement prompt's attempts) are plain text at position 0, as any other non-operand token, or they
        # would be numbered and masked as a third operand
        line = ((input_ids == break_id) & real).long().cumsum(dim=1)
        first_eq = is_eq.long().argmax(dim=1, keepdim=True)
        problem_line = torch.where(is_eq.any(dim=1, keepdim=True), line.gather(1, first_eq), line[:, -1:])
        elsewhere = (is_digit | is_plus) & (line != problem_line)
        pos = torch.where(elsewhere, torch.zeros_like(pos), pos)
        is_operand &= ~elsewhere
    return pos, is_operand


def coupled_attention_mask(pos, is_operand, valid, n_queries: int, dtype) -> torch.Tensor:
    """Float 4D mask [B, 1, n_queries, T] for the last `n_queries` positions: causal, no padding keys, and no
    operand key whose coupled id exceeds the query's. A float mask because a bool one is wrong under eager."""
    B, T = pos.shape
    q_index = torch.arange(T - n_queries, T, device=pos.device)
    k_index = torch.arange(T, device=pos.device)
    causal = k_index[None, :] <= q_index[:, None]  # [Q, T]
    q_pos = pos[:, -n_queries:]  # [B, Q]
    hidden_operand = is_operand[:, None, :] & (pos[:, None, :] > q_pos[:, :, None])  # [B, Q, T]
    allowed = causal[None] & valid.bool()[:, None, :] & ~hidden_operand
    allowed |= k_index[None, None, :] == q_index[None, :, None]  # a padding query still sees itself: no NaN rows
    mask = torch.zeros(allowed.shape, dtype=dtype, device=pos.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


class ArborModel(LlamaModel):
    """The Llama backbone, deriving coupled positions wherever it sees the whole sequence (no cache yet):
    training and scoring, including TRL's fused LM head, which calls the backbone directly."""

    config_class = ArborConfig

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        coupled = self.config.position_scheme == "coupled"
        if coupled and input_ids is not None and (cache is None or cache.get_seq_length() == 0):
            valid = (
                attention_mask
                if attention_mask is not None and attention_mask.dim() == 2
                else torch.ones_like(input_ids)
            )
            pos, is_operand = coupled_positions(self.config, input_ids, valid)
            position_ids = pos
            attention_mask = coupled_attention_mask(pos, is_operand, valid, input_ids.shape[1], self.dtype)
        elif coupled and (attention_mask is None or attention_mask.dim() != 4 or position_ids is None):
            raise ValueError(
                "a position-coupled model needs the whole sequence to place new tokens: decode through "
                "prepare_inputs_for_generation (as generate and arbor's search engine do)"
            )
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, **kwargs
        )


class ArborForCausalLM(LlamaForCausalLM):
    """Llama with optional position coupling: the backbone derives it on whole sequences, and
    `prepare_inputs_for_generation` (which sees the whole sequence) derives it when decoding with a cache."""

    config_class = ArborConfig

    def __init__(self, config: ArborConfig):
        super().__init__(config)
        self.model = ArborModel(config)
        self.post_init()

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, cache=None, attention_mask=None, **kwargs
    ):
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask, **kwargs
        )
        if self.config.position_scheme != "coupled" or cache is None or cache.get_seq_length() == 0:
            return inputs  # without a cache forward sees everything and derives positions itself
        valid = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        pos, is_operand = coupled_positions(self.config, input_ids, valid)
        n_new = inputs["input_ids"].shape[1]
        inputs["position_ids"] = pos[:, -n_new:]
        inputs["attention_mask"] = coupled_attention_mask(pos, is_operand, valid, n_new, self.dtype)
        return inputs

    def prepare_tree_inputs(self, ids: torch.Tensor, mask: torch.Tensor, tree: torch.Tensor, parents: list[int]):
        """Position ids [B, n] and a float 4D mask [B, 1, n, T + n] for a draft tree after `ids` [B, T] (the
        Decoder's tree step). With coupling, each node's position and visibility are those it would have at the
        end of its own root-to-node path, derived from that path's ids exactly as for a linear sequence."""
        if self.config.position_scheme != "coupled":
            return sequential_tree_inputs(mask, parents, self.dtype)
        B, T = ids.shape
        n = len(parents)
        path, depth, _ = tree_paths(parents, ids.device)  # path[i, p]: the node at depth p on node i's path, or -1
        D = path.shape[1]
        on_path = path >= 0  # [n, D]
        seq = torch.cat([ids[:, None, :].expand(B, n, T), tree[:, path.clamp(min=0)]], dim=-1)  # [B, n, T + D]
        valid = torch.cat([mask.bool()[:, None, :].expand(B, n, T), on_path[None].expand(B, n, D)], dim=-1)
        pos, is_operand = coupled_positions(self.config, seq.reshape(B * n, T + D), valid.reshape(B * n, T + D))
        pos, is_operand = pos.reshape(B, n, T + D), is_operand.reshape(B, n, T + D)
        q_index = (T + depth)[None, :, None].expand(B, n, 1)
        q_pos = pos.gather(-1, q_index)  # [B, n, 1]
        k_index = torch.arange(T + D, device=ids.device)
        allowed = (k_index <= q_index) & valid & ~(is_operand & (pos > q_pos))  # [B, n, T + D] along each path
        # the path positions back onto tree columns (padding slots add nothing: an int scatter-add, then > 0)
        tree_allowed = torch.zeros(B, n, n, dtype=torch.int32, device=ids.device).scatter_add_(
            -1, path.clamp(min=0)[None].expand(B, n, D), (allowed[..., T:] & on_path[None]).int())
        full = torch.cat([allowed[..., :T], tree_allowed > 0], dim=-1)
        return q_pos[..., 0], float_mask(full, self.dtype)[:, None]


AutoConfig.register("arbor", ArborConfig)
AutoModelForCausalLM.register(ArborConfig, ArborForCausalLM)


def build_char_tokenizer(charset: str = DEFAULT_CHARSET) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one token per character, round-trips text exactly."""
    chars = sorted(set(charset))
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def build_builtin_policy(cfg: BuiltinConfig = BuiltinConfig(), charset: str = DEFAULT_CHARSET,
                         coupling: PositionCoupling | None = ADDITION_COUPLING):
    """A fresh (untrained) built-in model and its tokenizer. With the coupled scheme, `coupling` (the task's,
    see tasks.PositionCoupling) says which tokens are operands; without one, or when the charset lacks its
    tokens, positions are sequential."""
    tokenizer = build_char_tokenizer(charset)
    vocab = tokenizer.get_vocab()
    coupled = (cfg.position_scheme == "coupled" and coupling is not None
               and all(c in vocab for c in coupling.operand_chars + coupling.separator + (coupling.joiner or "")))
    config = ArborConfig(
        position_scheme="coupled" if coupled else "sequential",
        digit_token_ids=[vocab[c] for c in coupling.operand_chars] if coupled else [],
        plus_token_id=vocab[coupling.joiner] if coupled and coupling.joiner else None,
        equals_token_id=vocab[coupling.separator] if coupled else None,
        operand_order=coupling.order if coupled else "forward",
        line_break_token_id=vocab.get("\n") if coupled else None,
        vocab_size=len(vocab),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.seed)
    model = ArborForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


class PolicyLoadError(ValueError):
    pass


def load_policy(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """Load a model folder (any transformers causal LM with its tokenizer) for inference, its parameters in
    `dtype` (Settings.dtype: float32, bfloat16 or float16)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    path = Path(path)
    if (path / "base.json").is_file():
        raise PolicyLoadError(f"{path} is a LoRA adapter version, not a whole model: it loads over the base its "
                              "base.json names (agent/adapters.py)")
    if not (path / "config.json").is_file():
        raise PolicyLoadError(f"{path} is not a model folder (no config.json): pass a save_pretrained directory")
    try:
        json.loads((path / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types; the user needs one clear line
        raise PolicyLoadError(f"{path} could not be loaded as a causal LM: {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device=device, dtype=getattr(torch, dtype)).eval()  # one of DTYPES: torch's own names
    return model, tokenizer


@dataclass
class Policy:
    """A loaded policy: what search and training need, plus which version it is."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    version: str = "unversioned"
    path: str | None = None
    # recycled-token drafts for greedy decoding (SearchConfig.recycling); hot across the jobs a worker runs
    draft_source: RecyclingMemory | None = None
    prompt_format: PromptFormat = RAW  # how prompts are put to the model (search, training, evaluation alike)
    # the version's value model (agent/value.py), which the 'value' scorer reads; None: that scorer is refused
    value_model: object | None = None

    @classmethod
    def load(
        cls, path: str | Path, version: str | None = None, device: str = "cpu", dtype: str = "float32"
    ) -> "Policy":
        """A saved policy with the recycling matrix saved beside it (a fresh one when there is none)."""
        model, tokenizer = load_policy(path, device, dtype)
        memory = RecyclingMemory.load(path, model.config.vocab_size, device=model.device)
        return cls(model, tokenizer, version or Path(path).name, str(path), memory, PromptFormat.load(path))

    def memory_cache_factory(self):
        """The Decoder's cache factory for the context memory (SearchConfig.memory): a fresh ContextMemory sized
        to the model's trained window per prefill. ValueError (one line) when this model cannot run it."""
        # a LoRA version (agent/adapters.py): the memory reads the model its adapters are injected into
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        check_model(model)
        return ContextMemory if model is self.model else lambda _: ContextMemory(model)
