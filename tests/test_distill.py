"""``matta distill`` end to end on a tiny GPT-2 and a byte-level BPE tokenizer, and its refusals.

The checkpoint is a ``transformers`` GPT-2 with random weights and the tokenizer is trained
here with ``tokenizers`` on Python's own help text (``pydoc_data.topics``, which ships
offline); both are saved with ``save_pretrained``, as a downloaded model would be.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, pipeline

from matta import MatTA
from matta.__main__ import main
from matta.distill import METRICS_FILE, distill, parse_students, sequences
from matta.errors import FormatError, GranularityError, InputError, OptionError, SaveError, SpecError
from matta.hf import read_gpt2

SEQ_LEN = 32


def _text() -> str:
    return "\n".join(topics[k] for k in sorted(topics))[:40_000]


def _save_gpt2(folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int, n_layer: int) -> None:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_head=4, n_layer=n_layer, vocab_size=len(tokenizer), n_positions=64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A TA and a Teacher checkpoint with their tokenizer, a text file, and one ``matta distill`` run."""
    root = tmp_path_factory.mktemp("distill")
    text = _text()
    (root / "text.txt").write_text(text, encoding="utf-8")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    _save_gpt2(root / "ta", tokenizer, seed=0, n_layer=2)
    _save_gpt2(root / "teacher", tokenizer, seed=1, n_layer=3)
    code = main(["distill", "--ta", str(root / "ta"), "--text", str(root / "text.txt"),
                 "--students", "S=0.25,M=0.5", "--steps", "30", "--seq-len", str(SEQ_LEN), "--batch-size", "4",
                 "--learning-rate", "3e-3", "--out", str(root / "out")])
    assert code == 0
    return root, tokenizer


def test_distill_writes_every_model_as_a_gpt2_checkpoint_with_its_tokenizer(job, capsys):
    root, tokenizer = job
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == ["M", "S", "TA", METRICS_FILE]
    metrics = json.loads((out / METRICS_FILE).read_text())
    ta_spec, _ = read_gpt2(root / "ta")
    sizes = {}
    for name in ("TA", "S", "M"):
        spec, _ = read_gpt2(out / name)
        assert spec.tie_embeddings and (spec.d_model, spec.n_layers, spec.vocab_size) == (32, 2, len(tokenizer))
        assert (out / name / "tokenizer.json").read_bytes() == (root / "ta" / "tokenizer.json").read_bytes()
        m = metrics["models"][name]
        assert m["params"] == spec.num_params and m["folder"] == name
        assert math.isclose(m["held_out_perplexity"], math.exp(m["held_out_loss"]))
        sizes[name] = spec.d_ff
    assert sizes == {"TA": 128, "S": 32, "M": 64}
    # Held out: the last tenth of the windows of the tokenized text, never trained on.
    ids = Tokenizer.from_file(str(root / "ta" / "tokenizer.json")).encode(_text(), add_special_tokens=False).ids
    n = (len(ids) - 1) // SEQ_LEN
    assert metrics["tokens"] == len(ids) and metrics["held_out_sequences"] == round(n * 0.1)
    assert metrics["train_sequences"] + metrics["held_out_sequences"] == n
    # Random weights predict ~uniformly; 30 steps of distillation must beat that on held-out text.
    for name in ("TA", "S", "M"):
        m = metrics["models"][name]
        assert m["held_out_loss"] < m["held_out_loss_before"] - 0.1, (name, m)


def test_distilled_students_reload_to_the_reported_loss(job):
    root, _ = job
    metrics = json.loads((root / "out" / METRICS_FILE).read_text())
    ids = np.asarray(Tokenizer.from_file(str(root / "ta" / "tokenizer.json")).encode(_text(), add_special_tokens=False).ids)
    _, _, x_held, y_held = sequences(ids, SEQ_LEN)
    for name in ("S", "TA"):
        reloaded = MatTA.from_pretrained(root / "out" / name, students={})
        loss = reloaded.evaluate(x_held, y_held)["TA"]["loss"]
        assert math.isclose(loss, metrics["models"][name]["held_out_loss"], rel_tol=1e-5)


def test_transformers_pipeline_generates_with_the_students(job):
    root, _ = job
    for name in ("S", "M"):
        generate = pipeline("text-generation", model=str(root / "out" / name), device="cpu")
        text = generate("The import statement", max_new_tokens=8, do_sample=False)[0]["generated_text"]
        assert text.startswith("The import statement") and len(text) > len("The import statement")


def test_a_teacher_checkpoint_gives_the_targets(job, tmp_path, monkeypatch):
    root, _ = job
    seen = []
    fit = MatTA.fit

    def spy(self, x, y, **kwargs):
        seen.append(kwargs["teacher"])
        return fit(self, x, y, **kwargs)

    monkeypatch.setattr(MatTA, "fit", spy)
    metrics = _run(root, tmp_path, teacher=str(root / "teacher"), steps=2)
    (teacher,) = seen
    assert teacher.path == str(root / "teacher") and teacher.spec.n_layers == 3
    assert metrics["teacher"] == str(root / "teacher") and sorted(metrics["models"]) == ["S", "TA"]


def test_parse_students_reads_fractions_and_per_dimension_sizes():
    assert parse_students("S=0.25,M=0.5") == {"S": 0.25, "M": 0.5}
    assert parse_students("S=d_ff:0.25+n_layers:1") == {"S": {"d_ff": 0.25, "n_layers": 1}}
    for bad in ("S", "S=", "S=big", "S=0.5,S=0.25", "TA=0.5", "S=d_ff:"):
        with pytest.raises(OptionError, match="--students"):
            parse_students(bad)


def _run(root: Path, tmp_path: Path, **changes):
    options = dict(ta=str(root / "ta"), text=[str(root / "text.txt")], students={"S": 0.25}, steps=1,
                   out=str(tmp_path / "out"), seq_len=SEQ_LEN, echo=None)
    options.update(changes)
    return distill(**options)


def test_bad_input_is_refused_before_training(job, tmp_path, monkeypatch):
    root, _ = job
    # Any training call is a failure: every refusal comes first.
    monkeypatch.setattr(MatTA, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(FormatError, match="no such directory"):
        _run(root, tmp_path, ta=str(tmp_path / "missing"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SpecError, match="model_type"):
        _run(root, tmp_path, ta=str(bert))
    untokenized = tmp_path / "no-tokenizer"
    untokenized.mkdir()
    for name in ("config.json", "model.safetensors"):
        (untokenized / name).write_bytes((root / "ta" / name).read_bytes())
    with pytest.raises(FormatError, match="tokenizer.json"):
        _run(root, tmp_path, ta=str(untokenized))
    (tmp_path / "short.txt").write_text("def f(): pass\n")
    with pytest.raises(InputError, match="at least 2 \\* seq_len"):
        _run(root, tmp_path, text=[str(tmp_path / "short.txt")])
    with pytest.raises(InputError, match="readable UTF-8"):
        _run(root, tmp_path, text=[str(tmp_path / "absent.txt")])
    with pytest.raises(GranularityError, match="'S' cannot be written as a GPT-2 checkpoint.*n_heads"):
        _run(root, tmp_path, students={"S": {"n_heads": 2}})   # 2 heads 8 wide in d_model 32
    with pytest.raises(FormatError, match="no such directory"):
        _run(root, tmp_path, teacher=str(tmp_path / "missing"))
    with pytest.raises(OptionError, match="--seq-len"):
        _run(root, tmp_path, seq_len=65)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(SaveError):
        _run(root, tmp_path, out=str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()


def test_the_cli_reports_a_matta_error_and_exit_code_1(job, tmp_path, capsys):
    root, _ = job
    code = main(["distill", "--ta", str(tmp_path / "missing"), "--text", str(root / "text.txt"), "--steps", "1",
                 "--out", str(tmp_path / "out")])
    assert code == 1
    assert "matta distill: error:" in capsys.readouterr().err
