"""The decoder's configuration and its Hugging Face ``config.json`` form.

One dataclass describes every model this package builds: a Llama-family decoder (RMSNorm, RoPE,
GQA, SwiGLU). ``from_hf_dict`` reads the ``config.json`` of the Llama, Qwen2, Qwen3 and
openPangu-Embedded families and refuses, naming the key, any feature the decoder would silently
compute differently (RoPE scaling, sliding windows, experts, another activation, ...).
``to_hf_dict`` writes the config back in the plainest family that describes it exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "ModelConfig"]

# Architecture shapes by name; ``ModelConfig.preset`` adds the vocabulary size.
PRESETS: dict[str, dict[str, Any]] = {
    # Fast tests.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "base": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    # openPangu-Embedded-1B (model card: 26 layers, hidden 1536, 12 query / 6 kv heads, 32k
    # context, vocabulary 153376). The family's modeling code (PanguEmbeddedAttention) puts one
    # `bias` switch on q, k, v and o, and its released configs set it with rms_norm_eps 1e-5; we
    # assume the 1B checkpoint does the same. Special token ids are left to the tokenizer because
    # the vocabulary size is the caller's.
    "openpangu-1b": dict(
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=26,
        num_attention_heads=12,
        num_key_value_heads=6,
        head_dim=128,
        rope_theta=4.0e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        attention_bias=True,
        o_proj_bias=True,
    ),
}

# config.json keys that do not change what the model computes.
_IGNORED_HF_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "architectures",
        "auto_map",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "initializer_range",
        "pretraining_tp",  # a matmul split of the same math in HF Llama
        "max_window_layers",  # only read when use_sliding_window is true (checked)
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "torchscript",
        "is_decoder",
        "is_encoder_decoder",
        "tokenizer_class",
        "id2label",
        "label2id",
        "problem_type",
        "task_specific_params",
        "finetuning_task",
        "chunk_size_feed_forward",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "sep_token_id",
        "unk_token_id",
        "decoder_start_token_id",
        "prefix",
    }
)

# Mixture-of-experts keys of HF configs; any truthy value is an MoE model.
_MOE_KEYS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_intermediate_size",
    "num_experts_per_tok",
    "n_shared_experts",
    "shared_expert_intermediate_size",
)

# Keys of features no model of these families needs and this decoder does not implement: they
# must be absent or null/false/zero.
_UNSUPPORTED_IF_SET = (
    "quantization_config",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "logits_scaling",
    "embedding_multiplier",
    "residual_multiplier",
    "attention_multiplier",
    "rope_interleaved",
    "rotary_dim",
)

# Marks a key from_hf_dict cannot default.
_REQUIRED = object()

# model_type (lower case) -> the family's defaults for keys its config.json may omit.
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, head_dim=None),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, head_dim=None),
    # Qwen3Config's default head_dim is 128, not hidden_size // num_attention_heads.
    "qwen3": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, head_dim=128),
    "panguembedded": dict(
        rms_norm_eps=1e-5, rope_theta=16.0e6, tie_word_embeddings=False, head_dim=None
    ),
}


@dataclass
class ModelConfig:
    """Shape and options of a Llama-family decoder.

    Attributes:
        vocab_size: rows of the embedding and of the LM head.
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU MLP.
        num_hidden_layers: decoder layers.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (GQA); divides ``num_attention_heads``.
        head_dim: per-head width; None means ``hidden_size // num_attention_heads``.
        rope_theta: RoPE base, ``inv_freq_i = rope_theta ** (-2i / head_dim)``.
        rms_norm_eps: epsilon of every RMSNorm.
        max_position_embeddings: longest document the model accepts.
        tie_word_embeddings: the LM head is the embedding matrix.
        attention_bias: bias on the q, k and v projections (Qwen2-style when alone).
        o_proj_bias: bias on the output projection too (HF Llama's ``attention_bias`` and
            openPangu-Embedded's ``bias`` set both).
        qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3's q_norm / k_norm).
        bos_token_id, eos_token_id, pad_token_id: special tokens, as in ``config.json``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    o_proj_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            _check_positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not given"
                )
        else:
            _check_positive_int("head_dim", self.head_dim)
        if self.resolved_head_dim % 2 != 0:
            # RoPE rotates the two halves of each head against each other.
            raise ValueError(f"the head dim must be even for RoPE, got {self.resolved_head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
            setattr(self, name, float(value))
        for name in ("tie_word_embeddings", "attention_bias", "o_proj_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.o_proj_bias and not self.attention_bias:
            raise ValueError(
                "o_proj_bias=True needs attention_bias=True: no supported family has a bias on "
                "the output projection only"
            )
        if self.qk_norm and self.attention_bias != self.o_proj_bias:
            raise ValueError(
                "qk_norm (Qwen3) puts attention_bias on q, k, v and o alike: set o_proj_bias "
                "equal to attention_bias"
            )
        for name in ("bos_token_id", "pad_token_id"):
            self._check_token_id(name, getattr(self, name))
        if isinstance(self.eos_token_id, list | tuple):
            if not self.eos_token_id:
                raise ValueError("eos_token_id must not be an empty list (use None)")
            self.eos_token_id = [
                int(self._check_token_id("eos_token_id", t)) for t in self.eos_token_id
            ]
        else:
            self._check_token_id("eos_token_id", self.eos_token_id)

    def _check_token_id(self, name: str, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {value!r}")
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        return value

    # -----------------------------------------------------------------------------------------
    # Derived values

    @property
    def resolved_head_dim(self) -> int:
        """The per-head width: ``head_dim``, or ``hidden_size // num_attention_heads``."""
        if self.head_dim is not None:
            return self.head_dim
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (empty when None)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, list):
            return tuple(self.eos_token_id)
        return (self.eos_token_id,)

    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of the config.

        ``head_dim=None`` and the equal explicit head dim describe the same model and share a
        fingerprint.
        """
        canonical = dataclasses.asdict(self)
        canonical["head_dim"] = self.resolved_head_dim
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    # -----------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def preset(cls, name: str, vocab_size: int) -> ModelConfig:
        """A named shape (``tiny``, ``small``, ``base``, ``openpangu-1b``) for a vocabulary."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(vocab_size=vocab_size, **PRESETS[name])

    # -----------------------------------------------------------------------------------------
    # Hugging Face config.json

    def to_hf_dict(self, *, torch_dtype: str = "float32") -> dict[str, Any]:
        """The ``config.json`` dict of this model.

        Written as ``LlamaForCausalLM`` (model_type ``llama``, whose ``attention_bias`` covers
        q, k, v and o) whenever Llama describes the model exactly; a bias on q, k, v only is
        written as ``qwen2`` and ``qk_norm`` as ``qwen3``, the families that have those layers.

        Args:
            torch_dtype: name of the dtype of the saved weights (``"bfloat16"``, ...).
        """
        if self.qk_norm:
            model_type, architecture = "qwen3", "Qwen3ForCausalLM"
        elif self.attention_bias and not self.o_proj_bias:
            model_type, architecture = "qwen2", "Qwen2ForCausalLM"
        else:
            model_type, architecture = "llama", "LlamaForCausalLM"
        out: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,
        }
        if model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        elif model_type == "qwen2":
            out["use_sliding_window"] = False
            out["sliding_window"] = None
        else:
            out["attention_bias"] = self.attention_bias
            out["use_sliding_window"] = False
            out["sliding_window"] = None
        return out

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict (llama, qwen2, qwen3, PanguEmbedded).

        Raises:
            ValueError: naming the key, for a feature this decoder cannot honour (rope_scaling,
                sliding windows, mixture of experts, an activation other than silu, MLP bias,
                attention dropout, quantization, ...) or a missing required key.
        """
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        model_type = d.get("model_type")
        if not isinstance(model_type, str) or model_type.lower() not in _FAMILIES:
            raise ValueError(
                f"config.json: model_type {model_type!r} is not supported; expected one of "
                "'llama', 'qwen2', 'qwen3', 'PanguEmbedded'"
            )
        family = model_type.lower()
        defaults = _FAMILIES[family]
        used: set[str] = {"model_type"}

        def take(key: str, default: Any = _REQUIRED) -> Any:
            used.add(key)
            if key in d and d[key] is not None:
                return d[key]
            if default is _REQUIRED:
                raise ValueError(f"config.json: required key {key!r} is missing")
            return default

        _reject_unsupported(d, family, used)

        num_heads = take("num_attention_heads")
        if family == "qwen2":
            # Qwen2 always has a bias on q, k, v and never on o; it has no switch for it.
            used.add("attention_bias")
            qkv_bias, o_bias = True, False
        elif family == "panguembedded":
            qkv_bias = o_bias = bool(take("bias", True))
            used.add("attention_bias")
        else:
            qkv_bias = o_bias = bool(take("attention_bias", False))

        rope_theta = take("rope_theta", None)
        rope_parameters = d.get("rope_parameters")
        used.add("rope_parameters")
        if rope_parameters is not None:
            # transformers >= 5 keeps the RoPE base inside rope_parameters.
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
        if rope_theta is None:
            rope_theta = defaults["rope_theta"]

        config = cls(
            vocab_size=take("vocab_size"),
            hidden_size=take("hidden_size"),
            intermediate_size=take("intermediate_size"),
            num_hidden_layers=take("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=take("num_key_value_heads", num_heads),
            head_dim=take("head_dim", defaults["head_dim"]),
            rope_theta=rope_theta,
            rms_norm_eps=take("rms_norm_eps", defaults["rms_norm_eps"]),
            max_position_embeddings=take("max_position_embeddings", 4096),
            tie_word_embeddings=bool(take("tie_word_embeddings", defaults["tie_word_embeddings"])),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            qk_norm=family == "qwen3",
            bos_token_id=_special_token(take("bos_token_id", None)),
            eos_token_id=_special_token(take("eos_token_id", None)),
            pad_token_id=_special_token(take("pad_token_id", None)),
        )
        unknown = sorted(set(d) - used - _IGNORED_HF_KEYS)
        if unknown:
            warnings.warn(
                f"config.json: ignoring keys this decoder does not read: {unknown}",
                stacklevel=2,
            )
        return config


def _reject_unsupported(d: dict[str, Any], family: str, used: set[str]) -> None:
    """Raise a ValueError naming the first key of ``d`` that asks for an unsupported feature."""

    def reject(key: str, why: str) -> None:
        raise ValueError(f"config.json: {key}={d[key]!r} is not supported: {why}")

    used.update(
        (
            "hidden_act",
            "hidden_activation",
            "rope_scaling",
            "mlp_bias",
            "attention_dropout",
            "sliding_window",
            "use_sliding_window",
            "layer_types",
            "partial_rotary_factor",
            *_MOE_KEYS,
            *_UNSUPPORTED_IF_SET,
        )
    )
    for key in ("hidden_act", "hidden_activation"):
        if d.get(key) is not None and d[key] != "silu":
            reject(key, "the MLP is SwiGLU with silu")
    scaling = d.get("rope_scaling")
    if scaling is not None and _rope_type(scaling) != "default":
        reject("rope_scaling", "RoPE is unscaled (rope_scaling must be null)")
    parameters = d.get("rope_parameters")
    if parameters is not None:
        if not isinstance(parameters, dict) or _rope_type(parameters) != "default":
            reject("rope_parameters", "RoPE is unscaled (rope_type must be 'default')")
    if d.get("partial_rotary_factor") not in (None, 1, 1.0):
        reject("partial_rotary_factor", "RoPE rotates the whole head")
    if d.get("mlp_bias"):
        reject("mlp_bias", "the MLP projections have no bias")
    if d.get("attention_dropout"):
        reject("attention_dropout", "the decoder has no dropout")
    if d.get("use_sliding_window"):
        reject("use_sliding_window", "attention is full causal attention")
    if d.get("sliding_window") is not None and family in ("llama", "panguembedded"):
        # Without a use_sliding_window switch a set window is a live window.
        reject("sliding_window", "attention is full causal attention")
    layer_types = d.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        reject("layer_types", "every layer is full causal attention")
    for key in _MOE_KEYS:
        if d.get(key):
            reject(key, "the decoder is dense (no mixture of experts)")
    for key in _UNSUPPORTED_IF_SET:
        if d.get(key) not in (None, False, 0):
            reject(key, "this decoder does not implement it")


def _special_token(value: Any) -> Any:
    """HF configs write -1 for "no such token"; a list keeps its non-negative ids."""
    if isinstance(value, list):
        kept = [v for v in value if not (isinstance(v, int) and v < 0)]
        return kept or None
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        return None
    return value


def _rope_type(parameters: Any) -> str | None:
    if not isinstance(parameters, dict):
        return None
    return parameters.get("rope_type", parameters.get("type"))


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
