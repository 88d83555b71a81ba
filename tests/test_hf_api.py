"""Pretrained GPT-2 in, GPT-2 Students out, through the public API.

``MatTA.from_pretrained`` against ``transformers``' own logits, ``matta.hf.teacher``, and
``Extracted.save_pretrained`` loaded by ``transformers`` in a child process where ``import
matta`` fails (logits and greedy ``generate()``). Checkpoints are ``transformers`` models with
random weights (nothing can be downloaded here). Last, a tied parameter's gradient on each
backend is the sum of both uses' gradients. The Keras cases run on the engine ``KERAS_BACKEND`` names.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from matta import MatTA, Transformer, hf
from matta.backend import get_backend
from matta.errors import FormatError
from matta.hf import TOKENIZER_FILES, read_gpt2
from matta.losses import LossOptions, StepPlan, Term
from matta.nesting import full, resolve
from matta.spec_tests.strategies import inputs_for, targets_for, weights_for
from tests.test_hf import run_without_matta

TOL = 1e-5  # float32 logits, relative to max(1, |logit|)
BACKENDS = ("torch", "keras")
NEW_TOKENS = 20


def assert_logits_close(got: np.ndarray, want: np.ndarray, tol: float = TOL) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
    assert err.max() <= tol, f"max relative logit difference {err.max():.3g} > {tol}"


def checkpoint(folder: Path, *, tied: bool = True, seed: int = 0, n_positions: int = 32) -> GPT2LMHeadModel:
    """A tiny random GPT-2 saved by ``save_pretrained`` into ``folder``, with stand-in tokenizer files."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=16, n_head=4, n_layer=2, n_inner=24, vocab_size=37, n_positions=n_positions,
                        tie_word_embeddings=tied, bos_token_id=3, eos_token_id=3)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    # The bytes matter, not the content: save_pretrained must copy these files unchanged.
    (folder / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(37)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return model


def hf_logits(model: GPT2LMHeadModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_from_pretrained_computes_transformers_logits_and_stays_tied(backend, tied, tmp_path):
    model = checkpoint(tmp_path / "gpt2", tied=tied)
    ta = MatTA.from_pretrained(tmp_path / "gpt2", students={"S": 0.25, "M": 0.5}, backend=backend, seed=3)
    assert ta.spec.tie_embeddings is tied and ("head.kernel" in ta.weights) is not tied
    assert ta.pretrained == str(tmp_path / "gpt2") and ta.seed == 3 and ta.dtype == "float32"
    ids = np.random.default_rng(0).integers(0, 37, size=(3, 32))
    assert_logits_close(ta.predict(ids), hf_logits(model, ids))
    # The Students are the TA's sub-networks: extracted and nested agree.
    for name in ("S", "M"):
        np.testing.assert_allclose(ta.extract(name).predict(ids), ta.predict(ids, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_teacher_gives_transformers_logits_batch_by_batch(backend, tmp_path):
    model = checkpoint(tmp_path / "teacher", seed=1)
    teacher = hf.teacher(tmp_path / "teacher", backend=backend, batch_size=2)
    ids = np.random.default_rng(1).integers(0, 37, size=(5, 9))   # 2 + 2 + 1 sequences
    assert_logits_close(teacher(ids), hf_logits(model, ids))
    assert teacher.spec.tie_embeddings and teacher.backend.name == backend


def test_training_from_pretrained_with_a_checkpoint_teacher_moves_the_tied_head_with_the_embedding(tmp_path):
    checkpoint(tmp_path / "ta", seed=0)
    checkpoint(tmp_path / "teacher", seed=1)
    ta = MatTA.from_pretrained(tmp_path / "ta", students={"S": 0.5}, backend="torch", seed=0, learning_rate=1e-2)
    before = ta.weights
    ids = np.random.default_rng(2).integers(0, 37, size=(8, 12))
    ta.fit(ids[:, :-1], ids[:, 1:], steps=3, batch_size=4, teacher=hf.teacher(tmp_path / "teacher"))
    after = ta.weights
    assert sorted(after) == sorted(before) and "head.kernel" not in after
    assert not np.array_equal(after["embed.tokens"], before["embed.tokens"])
    ta.extract("TA").save_pretrained(tmp_path / "out")
    spec, w = read_gpt2(tmp_path / "out")
    assert spec.tie_embeddings and np.array_equal(w["embed.tokens"], after["embed.tokens"])


def test_save_pretrained_copies_the_tokenizer_files_found_next_to_the_source(tmp_path):
    checkpoint(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    ta = MatTA.from_pretrained(tmp_path / "gpt2", backend="torch")
    folder = Path(ta.extract("S").save_pretrained(tmp_path / "s"))
    copied = sorted(n for n in TOKENIZER_FILES if (folder / n).exists())
    assert copied == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    assert all((folder / n).read_bytes() == (tmp_path / "gpt2" / n).read_bytes() for n in copied)
    config = json.loads((folder / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (3, 3)   # kept from the source: inside the vocab
    # A model not started from a checkpoint writes no tokenizer files and no token ids.
    plain = MatTA(ta.spec, backend="torch").extract("S")
    folder = Path(plain.save_pretrained(tmp_path / "plain"))
    assert not any((folder / n).exists() for n in TOKENIZER_FILES)
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] is None


def test_from_pretrained_refuses_what_is_not_a_gpt2_checkpoint(tmp_path):
    with pytest.raises(FormatError, match="no such directory"):
        MatTA.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="config.json is missing"):
        MatTA.from_pretrained(tmp_path / "empty")
    with pytest.raises(FormatError, match="no such directory"):
        hf.teacher(tmp_path / "missing")


# --- matta's Students in transformers, with matta out of reach -------------------------------------

_CHILD = textwrap.dedent(
    """
    import numpy as np, torch
    from transformers import AutoModelForCausalLM

    cases = json.load(open(sys.argv[1]))
    out = {}
    for name, case in cases.items():
        model = AutoModelForCausalLM.from_pretrained(case["folder"]).eval()
        ids = torch.tensor(np.load(case["ids"]))
        with torch.no_grad():
            out[name + "/logits"] = model(ids).logits.float().numpy()
            prompt = ids[:, : case["prompt"]]
            out[name + "/generated"] = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=case["new"], do_sample=False,
                pad_token_id=0).numpy()
    np.savez(sys.argv[2], **out)
    """
)


def greedy(student, prompt: np.ndarray, new: int) -> np.ndarray:
    """Greedy decoding with matta's logits: append the argmax of the last position ``new`` times."""
    ids = prompt
    for _ in range(new):
        ids = np.concatenate([ids, student.predict(ids)[:, -1].argmax(-1)[:, None]], axis=1)
    return ids


@pytest.mark.subprocess
@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_students_load_in_transformers_and_generate_what_matta_decodes(backend, tmp_path):
    checkpoint(tmp_path / "gpt2")
    ta = MatTA.from_pretrained(tmp_path / "gpt2", students={"S": 0.25}, backend=backend)
    rng = np.random.default_rng(4)
    cases, expected = {}, {}
    # "heads" keeps 2 heads 4 wide of d_model 8: a GPT-2 only when padded to 8 / 4 heads.
    for name, g, pad in (("S", "S", False), ("heads", {"n_heads": 2, "d_model": 8}, True), ("TA", "TA", False)):
        student = ta.extract(g)
        folder = student.save_pretrained(tmp_path / name, pad=pad)
        ids = rng.integers(0, 37, size=(2, 32))
        np.save(tmp_path / f"{name}-ids.npy", ids)
        cases[name] = {"folder": folder, "ids": str(tmp_path / f"{name}-ids.npy"), "prompt": 5, "new": NEW_TOKENS}
        expected[name] = (student.predict(ids), greedy(student, ids[:, :5], NEW_TOKENS))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    run_without_matta(_CHILD, str(tmp_path / "cases.json"), str(tmp_path / "out.npz"), cwd=tmp_path)
    got = np.load(tmp_path / "out.npz")
    for name, (logits, decoded) in expected.items():
        assert_logits_close(got[name + "/logits"], logits)
        assert decoded.shape == (2, 5 + NEW_TOKENS)
        np.testing.assert_array_equal(got[name + "/generated"], decoded)


# --- the tied parameter's gradient ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tied_parameter_gets_the_sum_of_both_uses_gradients(backend):
    tied = Transformer(vocab_size=11, max_len=6, d_model=8, n_layers=2, n_heads=2, d_ff=12, tie_embeddings=True)
    untied = replace(tied, tie_embeddings=False)
    w = weights_for(tied, seed=7, dtype="float32", scale=0.5)
    w_untied = {**w, "head.kernel": np.ascontiguousarray(w["embed.tokens"].T)}   # the same function, two matrices
    x = inputs_for(tied, 7, batch=3)
    targets = targets_for(tied, 7, 3, x, soft=True)
    plan = StepPlan(0, (Term("TA", full(tied), 1.0, None), Term("S", resolve(tied, {"d_model": 4, "n_heads": 1}), 0.5,
                                                                   "TA")), 0.4)
    b = get_backend(backend)
    loss_t, g_t = b.loss_and_gradients(b.build(tied, w, device="cpu"), x, targets, plan, LossOptions())
    loss_u, g_u = b.loss_and_gradients(b.build(untied, w_untied, device="cpu"), x, targets, plan, LossOptions())
    assert "head.kernel" not in g_t and abs(loss_t - loss_u) <= 1e-5 * max(1.0, abs(loss_u))
    np.testing.assert_allclose(g_t["embed.tokens"], g_u["embed.tokens"] + g_u["head.kernel"].T, rtol=1e-4, atol=1e-5)
    for name in g_t:
        if name != "embed.tokens":
            np.testing.assert_allclose(g_t[name], g_u[name], rtol=1e-4, atol=1e-5, err_msg=name)

