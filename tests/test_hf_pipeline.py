"""Hugging Face checkpoints in the pipeline: HF teachers and students on the transformers backend,
caches crossing backends, an end-to-end run with resume, the tokenizer/chat-template options and
the config errors.

The references are transformers' own eager forward on each document alone (its ``logits``, bias
and final softcap included) fed to ``sparse_kd_reference``; models are tiny random checkpoints
built from configs (no download), with the byte tokenizer's vocabulary.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from pangu_fastkd.backends import load_model_spec  # noqa: E402
from pangu_fastkd.cache import CacheReader  # noqa: E402
from pangu_fastkd.data import (  # noqa: E402
    CHATML_TEMPLATE,
    ByteTokenizer,
    Example,
    HFTokenizer,
    Message,
    default_template,
    pack_examples,
    tokenize_example,
)
from pangu_fastkd.hf import HFCausalLM, HFChatTemplate  # noqa: E402
from pangu_fastkd.model import DecoderLM, ModelConfig, init_weights  # noqa: E402
from pangu_fastkd.ops import SparseKDOptions, TopKTarget, sparse_kd_reference  # noqa: E402
from pangu_fastkd.scoring import ScoringConfig, score_to_cache, teacher_sequence  # noqa: E402
from pangu_fastkd.train import ConfigError, load_config  # noqa: E402
from pangu_fastkd.train.__main__ import main  # noqa: E402
from pangu_fastkd.train.config import config_from_dict  # noqa: E402
from pangu_fastkd.train.loop import LossModule, StageRunner  # noqa: E402
from pangu_fastkd.train.pipeline import Pipeline  # noqa: E402
from pangu_fastkd.train.training import wrap_for_ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = ByteTokenizer()
TEMPLATE = default_template(TOKENIZER)
V = TOKENIZER.vocab_size
K = 8


def _hf_config(arch: str, **overrides):
    common = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=TOKENIZER.eos_id,
    )
    if arch == "gemma2":
        # A final softcap that bites (the random logits are ~0.4); no attention softcap, which
        # pangu_fastkd attention refuses.
        common.update(final_logit_softcapping=0.3, attn_logit_softcapping=None)
    common.update(overrides)
    cls = {
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma2": transformers.Gemma2Config,
    }[arch]
    return cls(**common)


def _hf_dir(root: Path, arch: str, seed: int) -> Path:
    """A random transformers checkpoint (biases and norms perturbed, so all of them matter)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    directory = root / f"{arch}-{seed}"
    model.save_pretrained(str(directory))
    return directory


def _eager(directory: Path):
    """transformers' own model of a directory, eager attention, in eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), attn_implementation="eager", local_files_only=True
    )
    return model.eval()


def _eager_logits(model, ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[T, V]`` transformers logits of each document of a packed row, run alone."""
    docs = [ids[a:b] for a, b in itertools.pairwise(cu_seqlens.tolist())]
    return torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])


def _examples(n: int = 6) -> list[Example]:
    out = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        messages = (
            Message("user", f"What is {a} + {b}?"),
            Message("assistant", f"{a} + {b} = {a + b}." + " Checked." * (i % 3)),
        )
        out.append(Example(id=f"ex{i}", messages=messages, answer=str(a + b)))
    return out


def _target_from_logits(logits: torch.Tensor, labels: torch.Tensor, temp: float) -> TopKTarget:
    """What the cache should hold for rows with these full teacher logits ``[n, V]``."""
    top = logits.topk(K, dim=1)
    return TopKTarget(
        ids=top.indices.int(),
        logits=top.values,
        lse=torch.logsumexp(logits / temp, dim=1),
        label_logit=logits[torch.arange(len(labels)), labels],
        temperature=temp,
    )


def _cat_targets(targets: list[TopKTarget]) -> TopKTarget:
    return TopKTarget(
        ids=torch.cat([t.ids for t in targets]),
        logits=torch.cat([t.logits for t in targets]),
        lse=torch.cat([t.lse for t in targets]),
        label_logit=torch.cat([t.label_logit for t in targets]),
        temperature=targets[0].temperature,
    )


def _embedded(seed: int) -> DecoderLM:
    model = DecoderLM(ModelConfig.preset("tiny", V))
    init_weights(model, seed=seed)
    return model


# ---------------------------------------------------------------------------------------------
# (a) an HF teacher's cache trains an embedded student


@pytest.mark.parametrize(
    ("arch", "backend"), [("qwen2", "transformers"), ("gemma2", "auto")], ids=["qwen2", "gemma2"]
)
def test_hf_teacher_cache_trains_embedded_student(tmp_path, arch, backend):
    teacher_dir = _hf_dir(tmp_path, arch, seed=0)
    teacher = load_model_spec(teacher_dir, backend, torch.float32)
    assert isinstance(teacher, HFCausalLM)  # qwen2 asked for; gemma2 by "auto"
    examples = _examples()
    config = ScoringConfig(
        k=K,
        temperature=1.5,
        codec="v1",
        value_dtype="fp32",
        label_conditioned=True,
        batch_tokens=90,
    )
    score_to_cache(teacher, TOKENIZER, TEMPLATE, examples, tmp_path / "cache", config)
    reader = CacheReader(tmp_path / "cache")

    # The reference targets: transformers' own logits on each teacher sequence.
    eager = _eager(teacher_dir)
    reference: dict[str, TopKTarget] = {}
    with torch.no_grad():
        for ex in examples:
            seq = teacher_sequence(
                ex, TOKENIZER, TEMPLATE, condition_template=config.condition_template
            )
            logits = eager(input_ids=torch.tensor(seq.teacher_ids)[None]).logits[0]
            reference[ex.id] = _target_from_logits(
                logits[list(seq.rows)], torch.tensor(seq.labels), 1.5
            )

    student = _embedded(seed=1)
    kd = SparseKDOptions(kd_weight=0.7, temperature=1.5)
    module = LossModule(student, kd)
    tokenized = [tokenize_example(ex, TOKENIZER, TEMPLATE) for ex in examples]
    batches = pack_examples(tokenized, 160, order="keep")
    assert len(batches) > 1 and any(len(b.example_ids) > 1 for b in batches)
    for batch in batches:
        target = reader.targets_for_batch(batch.example_ids, batch.supervised_counts, "topk")
        expected_target = _cat_targets([reference[i] for i in batch.example_ids])
        assert torch.equal(target.ids, expected_target.ids)
        num_items = 37.0
        loss = module(batch, target, num_items)
        hidden = student.hidden_states(batch.input_ids, batch.cu_seqlens)
        rows = batch.labels != -100
        expected, _ = sparse_kd_reference(
            hidden[rows],
            student.output_weight,
            batch.labels[rows],
            expected_target,
            kd_weight=0.7,
            temperature=1.5,
            reduction="sum",
            num_items=num_items,
        )
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_scoring_cli_runs_an_hf_teacher(tmp_path):
    from pangu_fastkd.data import write_jsonl
    from pangu_fastkd.data.records import example_to_record
    from pangu_fastkd.scoring.__main__ import main as score_main

    teacher_dir = _hf_dir(tmp_path, "gemma2", seed=8)
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [example_to_record(ex) for ex in _examples(3)])
    argv = ["--teacher", str(teacher_dir), "--data", str(data), "--out", str(tmp_path / "c")]
    assert score_main([*argv, "--k", "4", "--codec", "v1", "--value-dtype", "fp32"]) == 0
    teacher = load_model_spec(teacher_dir, "transformers", torch.float32)
    spec = CacheReader(tmp_path / "c").manifest.spec
    assert spec.teacher_fingerprint == teacher.weights_fingerprint() and spec.vocab_size == V
    assert score_main([*argv, "--backend", "embedded"]) == 1  # gemma2 is not embedded


# ---------------------------------------------------------------------------------------------
# (b) an embedded teacher's cache trains an HF student


@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])
def test_embedded_teacher_cache_trains_hf_student(tmp_path, arch):
    teacher = _embedded(seed=2).eval()
    examples = _examples()
    config = ScoringConfig(k=K, codec="v1", value_dtype="fp32", label_conditioned=False)
    score_to_cache(teacher, TOKENIZER, TEMPLATE, examples, tmp_path / "cache", config)
    reader = CacheReader(tmp_path / "cache")

    student_dir = _hf_dir(tmp_path, arch, seed=3)
    student = load_model_spec(student_dir, "transformers", torch.float32)
    assert isinstance(student, HFCausalLM)
    assert (student.logit_softcap is not None) == (arch == "gemma2")
    kd = SparseKDOptions(kd_weight=0.6, divergence="forward_kl")
    module = LossModule(student, kd).train()
    eager = _eager(student_dir).train()  # no dropout in these configs: train mode is exact
    tokenized = [tokenize_example(ex, TOKENIZER, TEMPLATE) for ex in examples]
    batch = pack_examples(tokenized, 400, order="keep")[0]
    assert len(batch.example_ids) > 2
    target = reader.targets_for_batch(batch.example_ids, batch.supervised_counts, "topk")
    num_items = float(batch.num_supervised)

    loss = module(batch, target, num_items)
    loss.backward()
    rows = batch.labels != -100
    logits = _eager_logits(eager, batch.input_ids, batch.cu_seqlens)[rows]  # [N, V]
    # The logits as "hidden states" under an identity head: the reference sees exactly
    # transformers' logits (bias and softcap already applied).
    expected, _ = sparse_kd_reference(
        logits,
        torch.eye(V),
        batch.labels[rows],
        target,
        kd_weight=0.6,
        reduction="sum",
        num_items=num_items,
    )
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    ours = dict(student.hf_model.named_parameters())
    theirs = dict(eager.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in theirs.items():
        assert p.grad is not None and ours[name].grad is not None, name
        torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# (c) the pipeline end to end with HF teacher and student, and resume


def _pipeline_toml(teacher_dir: Path, student_dir: Path) -> str:
    return f"""
checkpoint_every = 1
[data]
source = "demo"
train_problems = 12
eval_problems = 2
max_difficulty = 1
[student]
path = "{student_dir}"
backend = "transformers"
[teachers.t]
path = "{teacher_dir}"
[eval]
max_examples = 2
max_new_tokens = 4
batch_size = 2
[[stages]]
name = "sft"
kind = "sft"
data = "train_fast"
train = {{ steps = 2, batch_tokens = 600, optim = {{ lr = 3e-3, warmup_steps = 0 }} }}
[[stages]]
name = "rollout"
kind = "rollout"
data = "train_fast"
max_new_tokens = 6
[[stages]]
name = "score"
kind = "score"
data = "rollout"
teacher = "t"
k = 4
[[stages]]
name = "kd"
kind = "kd"
cache = "score"
train = {{ steps = 3, batch_tokens = 600, optim = {{ lr = 3e-3, warmup_steps = 0 }} }}
"""


class _InterruptedError(Exception):
    pass


def test_pipeline_with_hf_teacher_and_student_and_resume(tmp_path, monkeypatch):
    teacher_dir = _hf_dir(tmp_path, "gemma2", seed=4)  # "auto" picks transformers
    student_dir = _hf_dir(tmp_path, "qwen3", seed=5)
    config = tmp_path / "hf.toml"
    config.write_text(_pipeline_toml(teacher_dir, student_dir))

    trained: dict[str, HFCausalLM] = {}
    evaluate = Pipeline.evaluate

    def keep_model(self, model, stage_name, schedule):
        trained[stage_name] = model
        return evaluate(self, model, stage_name, schedule)

    monkeypatch.setattr(Pipeline, "evaluate", keep_model)
    whole = tmp_path / "whole"
    assert main([str(config), "--run-dir", str(whole)]) == 0
    assert isinstance(trained["kd"], HFCausalLM)

    # The final student loads in transformers as saved, with the trained model's logits.
    final_dir = whole / "stages" / "3-kd" / "model"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(final_dir), local_files_only=True, attn_implementation="eager"
    ).eval()
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    ids = torch.tensor(TOKENIZER.encode("What is 2 + 3? 2 + 3 = 5. Answer: 5"))
    with torch.no_grad():
        ours = trained["kd"].eval()(ids)
        theirs = reloaded(input_ids=ids[None]).logits[0]
        start = transformers.AutoModelForCausalLM.from_pretrained(
            str(student_dir), local_files_only=True
        )(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs, start, atol=1e-4)  # training changed the student
    manifest = json.loads((whole / "stages" / "2-score" / "cache" / "manifest.json").read_text())
    assert manifest["spec"]["vocab_size"] == V

    # Interrupted in the KD stage after its checkpoint at step 1, then resumed: same weights.
    step = StageRunner.step

    def interrupting_step(self, i):
        if self.cache is not None and i == 2:
            raise _InterruptedError
        return step(self, i)

    monkeypatch.setattr(StageRunner, "step", interrupting_step)
    killed = tmp_path / "killed"
    with pytest.raises(_InterruptedError):
        main([str(config), "--run-dir", str(killed)])
    assert (killed / "stages" / "3-kd" / "checkpoint" / "state.json").is_file()
    assert not (killed / "stages" / "3-kd" / "done.json").exists()
    monkeypatch.setattr(StageRunner, "step", step)
    assert main(["--resume", str(killed)]) == 0
    assert isinstance(trained["kd"], HFCausalLM)
    a = transformers.AutoModelForCausalLM.from_pretrained(str(final_dir), local_files_only=True)
    b = transformers.AutoModelForCausalLM.from_pretrained(
        str(killed / "stages" / "3-kd" / "model"), local_files_only=True
    )
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_torchrun_ddp_hf_student_matches_one_process(tmp_path):
    """DDP trains an HF student: 2 ranks x 1 micro-batch give the weights of 1 rank x 2."""
    teacher_dir = _hf_dir(tmp_path, "gemma2", seed=4)
    student_dir = _hf_dir(tmp_path, "qwen3", seed=5)
    text = _pipeline_toml(teacher_dir, student_dir).replace(
        "batch_tokens = 600", "batch_tokens = 300"
    )
    one, two = tmp_path / "one.toml", tmp_path / "two.toml"
    one.write_text(text.replace("batch_tokens = 300", "batch_tokens = 300, grad_accum = 2"))
    two.write_text(text)
    assert main([str(one), "--run-dir", str(tmp_path / "one")]) == 0
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pangu_fastkd.train", str(two), "--run-dir", str(tmp_path / "two"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("0-sft", "3-kd"):
        a = load_file(tmp_path / "one" / "stages" / stage / "model" / "model.safetensors")
        b = load_file(tmp_path / "two" / "stages" / stage / "model" / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            # The all-reduce may sum in another order than accumulation (see test_train.py).
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template from the student's directory

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _student_with_tokenizer(tmp_path: Path) -> Path:
    """A Qwen3 checkpoint whose directory also holds a tiny word-level tokenizer and a ChatML
    chat template (the tokenizer knows the demo's words only as [UNK], which is enough here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    words += [str(i) for i in range(10)] + ["+", "=", "?", "."]
    backend = Tokenizer(
        models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    directory = _hf_dir(tmp_path, "qwen3", seed=6)
    tok.chat_template = CHATML
    tok.save_pretrained(str(directory))
    return directory


def test_student_tokenizer_and_its_own_chat_template(tmp_path):
    student_dir = _student_with_tokenizer(tmp_path)
    raw = {
        "run_dir": str(tmp_path / "run"),
        "data": {"tokenizer": "student", "chat_template_kwargs": {"unused_variable": 1}},
        "student": {"path": str(student_dir)},
        "stages": [{"name": "s", "kind": "sft", "data": "train_fast"}],
    }
    pipeline = Pipeline(config_from_dict(raw), _single())
    pipeline._load_data()
    assert isinstance(pipeline.tokenizer, HFTokenizer)
    assert isinstance(pipeline.template, HFChatTemplate)
    assert pipeline.template.template_kwargs == {"unused_variable": 1}
    example = Example(
        id="a",
        messages=(Message("user", "1 + 2 ?"), Message("assistant", "3 .")),
    )
    tokenized = tokenize_example(example, pipeline.tokenizer, pipeline.template)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(student_dir), local_files_only=True)
    expected = hf_tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in example.messages],
        tokenize=True,
        return_dict=False,
    )
    assert list(tokenized.input_ids) == list(expected)
    # Model directories the pipeline writes carry the tokenizer and its template.
    model = load_model_spec(student_dir, "auto", torch.float32)
    pipeline.save_model_dir(model, tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    again = transformers.AutoTokenizer.from_pretrained(
        str(tmp_path / "saved"), local_files_only=True
    )
    assert again.chat_template == CHATML

    # "default" ignores the directory's template: the built-in ChatML template of its tokens.
    raw["data"] = {"tokenizer": "student", "chat_template": "default"}
    pipeline = Pipeline(config_from_dict(raw), _single())
    pipeline._load_data()
    assert pipeline.template is CHATML_TEMPLATE
    # Template variables with no template of the directory's own to take them are refused.
    raw["data"] = {"tokenizer": "byte", "chat_template_kwargs": {"enable_thinking": False}}
    pipeline = Pipeline(config_from_dict(raw), _single())
    with pytest.raises(ValueError, match=r"chat_template_kwargs.*'byte' has no chat template"):
        pipeline._load_data()


def _single():
    from pangu_fastkd.distributed import DistributedContext

    return DistributedContext(rank=0, world_size=1, local_rank=0)


# ---------------------------------------------------------------------------------------------
# (d) config errors

BASE = {"stages": [{"name": "s", "kind": "sft", "data": "train_fast"}]}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"student": {"path": "x", "backend": "torch"}}, r"student\.backend: 'torch'"),
        ({"student": {"preset": "tiny", "backend": "embedded"}}, r"'backend' applies to 'path'"),
        (
            {"teachers": {"t": {"preset": "tiny", "backend": "transformers"}}},
            r"teachers\.t\.backend",
        ),
        (
            {"fsdp": True, "student": {"path": "x", "backend": "transformers"}},
            r"fsdp = true.*DDP only",
        ),
        ({"data": {"tokenizer": "student"}}, r"data\.tokenizer = 'student' needs a student"),
        ({"data": {"chat_template": "jinja"}}, r"data\.chat_template: 'jinja'"),
        (
            {"data": {"chat_template": "default", "chat_template_kwargs": {"a": 1}}},
            r"data\.chat_template_kwargs",
        ),
        ({"data": {"chat_template_kwargs": "x"}}, r"data\.chat_template_kwargs: expected dict"),
    ],
)
def test_config_errors_name_the_key(edit, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, **edit})


def test_shipped_hf_example_config_is_valid():
    config = load_config("hf_example")
    assert config.student.backend == "transformers" and config.data.tokenizer == "student"
    assert config.data.chat_template_kwargs == {"enable_thinking": False}


def test_auto_backend_reports_why_neither_backend_loads(tmp_path):
    directory = tmp_path / "odd"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match=r"embedded loader.*gpt2.*transformers backend"):
        load_model_spec(directory, "auto", torch.float32)
    # An HF student under fsdp chosen by "auto" is refused when the run wraps it.
    raw = {
        **BASE,
        "fsdp": True,
        "student": {"path": str(_hf_dir(tmp_path, "gemma2", seed=7))},
    }
    pipeline = Pipeline(config_from_dict(raw), _single())
    pipeline.context = type("Ctx", (), {"enabled": True})()
    student = load_model_spec(raw["student"]["path"], "auto", torch.float32)
    with pytest.raises(ValueError, match="DDP only"):
        wrap_for_ranks(LossModule(student), pipeline.config, pipeline.context)


def test_a_score_k_above_a_loaded_teachers_vocabulary_fails_before_training(tmp_path, capsys):
    # Only the loaded model knows its vocabulary: the check runs once it is built, before
    # the first stage trains.
    teacher_dir = _hf_dir(tmp_path, "qwen2", seed=4)
    student_dir = _hf_dir(tmp_path, "qwen3", seed=5)
    config = tmp_path / "hf.toml"
    config.write_text(_pipeline_toml(teacher_dir, student_dir).replace("k = 4", f"k = {V + 1}"))
    run_dir = tmp_path / "run"
    assert main([str(config), "--run-dir", str(run_dir)]) == 2
    error = capsys.readouterr().err
    assert f"stages.2.k = {V + 1} is larger than the vocabulary of teacher 't' ({V})" in error
    assert not (run_dir / "stages" / "0-sft").exists()
