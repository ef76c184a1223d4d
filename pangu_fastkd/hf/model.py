"""Hugging Face causal-LM models as teachers and students, and students transformers can load.

``HFCausalLM`` wraps a transformers ``*ForCausalLM`` in the protocol the trainer, scoring,
rollouts and eval use for the embedded ``DecoderLM``: ``hidden_states(input_ids [T],
cu_seqlens [B + 1]) -> [T, d]`` on a packed row (through ``attn_implementation="pangu_fastkd"``,
no logits built), ``output_weight [V, d]``, ``config.vocab_size`` /
``max_position_embeddings`` / ``eos_token_ids``, ``weights_fingerprint()``; and
``generate`` (transformers' ``generate`` with SDPA, since our attention refuses KV-cache
decoding; ``hf/generation.py``).

``HFCausalLM.save_pretrained`` writes the wrapped model's files; ``backends.save_model_dir``
makes a whole directory of them (tokenizer files included), replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.boundaries import resolve_documents
from ..model.modeling import check_packed_input_ids, hash_tensors
from ..model.sampling import Generation, GenerationConfig, check_prompts
from ._require import require_transformers
from .attention import DEFAULT_NAME, DOCUMENTS_KWARG, register_attention
from .generation import generate_hf
from .loss import lm_head_parts

__all__ = [
    "HFCausalLM",
    "HFModelConfig",
    "load_hf_causal_lm",
]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Config entries that say where a model came from or how it runs, not what it computes (plus
# every ``_``-prefixed one, e.g. ``_name_or_path``); save_pretrained itself sets architectures.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "attn_implementation", "architectures"}


@dataclass(frozen=True)
class HFModelConfig:
    """The part of a wrapped model's config the training code reads, like ``ModelConfig``'s.

    Attributes:
        vocab_size: rows ``V`` of the LM head (the logits' width).
        hidden_size: width ``d`` of the final hidden states.
        max_position_embeddings: longest document the model accepts.
        eos_token_ids: end-of-sequence ids of the config and the generation config, in order.
        model_type: transformers' ``model_type`` (``"llama"``, ``"qwen3"``, ...).
    """

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    model_type: str


class HFCausalLM(torch.nn.Module):
    """A transformers causal LM with the ``DecoderLM`` protocol over packed rows.

    Construction registers ``attn_implementation="pangu_fastkd"`` and switches the wrapped
    model to it (packed documents run through ``ops.packed_attention``); ``generate`` switches
    to SDPA for the duration of a decode only.

    Attributes:
        hf_model: the wrapped ``PreTrainedModel`` (a submodule: ``.parameters()``, ``.to()``,
            ``.train()`` reach it; parameter names are prefixed ``hf_model.``).
        config: the ``HFModelConfig``.
        backend: ``"transformers"``, the loader's name for this backend.
    """

    backend = "transformers"

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__()
        transformers = require_transformers()
        if not isinstance(hf_model, transformers.PreTrainedModel):
            raise TypeError(
                f"hf_model must be a transformers PreTrainedModel, got {type(hf_model).__name__}"
            )
        base = getattr(hf_model, "base_model", None)
        if base is None or base is hf_model:
            raise ValueError(
                f"{type(hf_model).__name__} has no separate base model to take hidden states "
                "from; pass a *ForCausalLM model"
            )
        lm_head_parts(hf_model)  # refuses heads the fused loss cannot express, now not mid-run
        register_attention()
        hf_model.set_attn_implementation(DEFAULT_NAME)
        self.hf_model = hf_model
        self.config = _model_config(hf_model)
        self.train(hf_model.training)  # a new Module starts in train mode; follow the model's

    # -----------------------------------------------------------------------------------------
    # The head

    @property
    def output_weight(self) -> Tensor:
        """The LM head ``[V, d]`` with the model's logit scale folded in (as ``loss.py`` does)."""
        head = lm_head_parts(self.hf_model)
        if head.logit_scale is None:
            return head.weight
        return head.weight * head.logit_scale

    @property
    def output_bias(self) -> Tensor | None:
        """The head's bias ``[V]`` (logit scale folded in), or None."""
        head = lm_head_parts(self.hf_model)
        if head.bias is None or head.logit_scale is None:
            return head.bias
        return head.bias * head.logit_scale

    @property
    def logit_softcap(self) -> float | None:
        """``c`` of the final-logit softcap ``c * tanh(z / c)``, or None."""
        return lm_head_parts(self.hf_model).softcap

    # -----------------------------------------------------------------------------------------
    # Training

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute the activations of every ``every``-th decoder layer (0, every, ...) in
        backward instead of keeping them; 0 turns it off, 1 checkpoints every layer.

        transformers' own activation checkpointing, non-reentrant: its decoder layers
        (``GradientCheckpointingLayer``) checkpoint inside ``forward``, in training mode with
        gradients enabled only, with our packed attention inside the recomputed region.

        Raises:
            ValueError: ``every`` is not an int >= 0, or the model does not support it.
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0 (0: off, 1: every layer), got {every!r}")
        model = self.hf_model
        if every == 0:
            _call_first(
                model, ("activation_checkpointing_disable", "gradient_checkpointing_disable")
            )
            return
        if not model.supports_gradient_checkpointing:
            raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
        # transformers 5 renamed gradient_checkpointing_enable (the old name is deprecated).
        names = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
        _call_first(model, names, {"use_reentrant": False})
        # Every layer is on now; keep every ``every``-th (each layer reads its own flag).
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index % every == 0
        # Enabling also hooks the embeddings to make their output require grad, for frozen
        # embeddings (adapters); the trainer trains them, and disabling would leave the hook.
        model.disable_input_require_grads()

    # -----------------------------------------------------------------------------------------
    # Forward passes

    def hidden_states(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states of one packed row, without the LM head.

        Args:
            input_ids: ``[T]`` int64 (or int32) token ids, ``T >= 1``.
            cu_seqlens: ``[B + 1]`` int32 document boundaries (0, ..., T).
            position_ids: ``[T]`` (or ``[1, T]``) positions restarting at 0 in each document.
                Give at most one of ``cu_seqlens`` and ``position_ids``; neither means one
                document.

        Returns:
            ``[T, d]`` in the model's dtype; the logits are
            ``softcap(hidden @ output_weight.T + output_bias)``.
        """
        input_ids = self._check_input_ids(input_ids)
        documents = resolve_documents(
            input_ids, cu_seqlens, position_ids, max_positions=self.config.max_position_embeddings
        )  # checked here once; the layers get them through DOCUMENTS_KWARG and trust them
        if self.hf_model.config._attn_implementation != DEFAULT_NAME:
            # Someone switched it (e.g. for their own generation); packed rows need ours.
            self.hf_model.set_attn_implementation(DEFAULT_NAME)
        # use_cache=False: a cache would also make transformers' masking ignore the packed
        # documents (see loss.py). Our attention reads the checked documents from their kwarg;
        # the cu_seq_lens kwargs carry the same boundaries for any layer that looks for those,
        # and position_ids give RoPE its per-document positions.
        out = self.hf_model.base_model(
            input_ids=input_ids[None],
            position_ids=documents.positions[None],
            use_cache=False,
            cu_seq_lens_q=documents.cu_seqlens,
            cu_seq_lens_k=documents.cu_seqlens,
            max_length_q=documents.max_seqlen,
            max_length_k=documents.max_seqlen,
            **{DOCUMENTS_KWARG: documents},
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[0]  # [T, d]

    def forward(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits ``[T, V]`` float32 of one packed row; arguments as ``hidden_states``."""
        hidden = self.hidden_states(input_ids, cu_seqlens, position_ids)
        logits = F.linear(hidden, self.output_weight, self.output_bias).float()
        cap = self.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def save_pretrained(self, directory: str | Path) -> None:
        """transformers' ``save_pretrained`` (safetensors) into ``directory``, with no trace of
        our attention name.

        The config records no attention implementation today; the check keeps it that way,
        since a ``config.json`` naming ``pangu_fastkd`` would not load where it is not
        registered.
        """
        directory = Path(directory)
        self.hf_model.save_pretrained(str(directory))
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        runtime_keys = [k for k in ("_attn_implementation", "attn_implementation") if k in config]
        if runtime_keys:
            for key in runtime_keys:
                del config[key]
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if not any(directory.glob("*.safetensors")):
            raise RuntimeError(
                f"transformers' save_pretrained wrote no safetensors into {directory}"
            )

    def weights_fingerprint(self) -> str:
        """sha256 (hex) over the config and every tensor's name, dtype, shape and bytes.

        As ``DecoderLM.weights_fingerprint``: stable across processes for the same weights in
        the same dtype; the attention implementation, the path it was loaded from and the
        transformers version do not enter it.
        """
        config = {
            k: v
            for k, v in self.hf_model.config.to_dict().items()
            if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")
        }
        text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
        digest = hashlib.sha256(text.encode("utf-8"))
        hash_tensors(digest, self.hf_model.state_dict())
        return digest.hexdigest()

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, batch_size: int = 16
    ) -> list[Generation]:
        """Continue every prompt, ``batch_size`` at a time, with transformers' ``generate``
        (``hf.generation.generate_hf``); the same checks and sampling rules as ``DecoderLM``.

        Returns:
            One ``Generation`` per prompt, in order.
        """
        checked = check_prompts(
            prompts,
            config,
            batch_size,
            vocab_size=self.config.vocab_size,
            max_positions=self.config.max_position_embeddings,
        )
        return generate_hf(self, checked, config, batch_size=batch_size)

    def _check_input_ids(self, input_ids: Tensor) -> Tensor:
        # Ids must fit both the head's V and the embedding table (they may differ when resized).
        embeddings = self.hf_model.get_input_embeddings().weight.shape[0]
        limit = min(self.config.vocab_size, embeddings)
        return check_packed_input_ids(input_ids, limit).long()


def _call_first(model: torch.nn.Module, names: Sequence[str], *args) -> None:
    """Calls the first method of ``names`` that ``model`` has (names differ across versions)."""
    for name in names:
        method = getattr(model, name, None)
        if method is not None:
            method(*args)
            return
    raise AttributeError(f"{type(model).__name__} has none of {list(names)}")


def _model_config(hf_model: torch.nn.Module) -> HFModelConfig:
    """``HFModelConfig`` from the wrapped model's (text) config and generation config."""
    config = hf_model.config.get_text_config()
    weight = lm_head_parts(hf_model).weight
    max_positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(
            f"{type(hf_model).__name__}'s config has no positive max_position_embeddings "
            f"(got {max_positions!r})"
        )
    eos: list[int] = []
    generation_config = getattr(hf_model, "generation_config", None)
    for source in (config, generation_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for token in [value] if isinstance(value, int) else list(value or ()):
            if int(token) not in eos:
                eos.append(int(token))
    return HFModelConfig(
        vocab_size=int(weight.shape[0]),
        hidden_size=int(weight.shape[1]),
        max_position_embeddings=max_positions,
        eos_token_ids=tuple(eos),
        model_type=str(getattr(config, "model_type", "")),
    )


# ---------------------------------------------------------------------------------------------
# Loading


def load_hf_causal_lm(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> HFCausalLM:
    """Load a local transformers causal-LM checkpoint as an ``HFCausalLM`` (nothing downloaded).

    Args:
        directory: holds ``config.json`` and the weights (safetensors, or ``pytorch_model.bin``,
            single or sharded with an index).
        dtype: floating dtype of the parameters.

    Returns:
        The wrapped model on the CPU, in eval mode, with ``attn_implementation="pangu_fastkd"``.

    Raises:
        FileNotFoundError: the directory, its ``config.json`` or its weights are missing.
    """
    transformers = require_transformers()
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    if not any((directory / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"{directory} has no weights: expected one of {', '.join(_WEIGHT_FILES)}"
        )
    register_attention()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), local_files_only=True, dtype=dtype, attn_implementation=DEFAULT_NAME
    )
    return HFCausalLM(hf_model.eval())
