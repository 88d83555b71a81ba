"""GPT-2 checkpoints in and out (``matta.hf``) against the real client, ``transformers``.

Models are built by ``transformers`` from random ``GPT2Config`` sizes with random weights (nothing
can be downloaded here), saved in the layouts real checkpoints use, read by matta and compared
logit for logit with ``matta.reference``; matta's own checkpoints are loaded by ``transformers``
in a child process where ``import matta`` fails.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from matta import MLP, Transformer, extract, reference
from matta.errors import FormatError, OptionError, SpecError
from matta.hf import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, read_gpt2, write_gpt2
from matta.weights import initial_weights
from matta.spec_tests.strategies import transformers, weights_for

_PROFILE = os.environ.get("MATTA_HYPOTHESIS_PROFILE", "dev")
_DERANDOMIZE = _PROFILE != "thorough"
# A transformers model per example: fewer examples than the core suites, scaled by the profile.
hf_examples = settings(max_examples={"smoke": 3, "dev": 8, "ci": 30, "thorough": 200}.get(_PROFILE, 8),
                       deadline=None, derandomize=_DERANDOMIZE)
core_examples = settings(max_examples={"smoke": 5, "dev": 25, "ci": 100, "thorough": 1000}.get(_PROFILE, 25),
                         deadline=None, derandomize=_DERANDOMIZE)

TOL = 1e-5  # float32 logits, relative to max(1, |logit|)
LAYOUTS = ("save_pretrained", "sharded", "original")


def assert_logits_close(got: np.ndarray, want: np.ndarray, tol: float = TOL) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
    assert err.max() <= tol, f"max relative logit difference {err.max():.3g} > {tol}"


@st.composite
def gpt2_configs(draw) -> dict:
    """``GPT2Config`` keyword arguments: tiny sizes, tied or not."""
    n_head = draw(st.integers(1, 3))
    return dict(
        n_embd=n_head * draw(st.integers(1, 4)),
        n_head=n_head,
        n_layer=draw(st.integers(1, 3)),
        n_inner=draw(st.one_of(st.none(), st.integers(1, 10))),
        vocab_size=draw(st.integers(2, 13)),
        n_positions=draw(st.integers(1, 8)),
        layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-3])),
        tie_word_embeddings=draw(st.booleans()),
    )


def hf_model(config: dict, seed: int) -> GPT2LMHeadModel:
    """A transformers GPT-2 with random weights; biases and norms are perturbed too."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config, bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def hf_tensors(model: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """What ``save_pretrained`` stores: the state dict, less a tied ``lm_head.weight``."""
    tied = model.config.tie_word_embeddings
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def save(model: GPT2LMHeadModel, folder: Path, layout: str) -> None:
    """Saves ``model`` as ``save_pretrained`` does, sharded, or as the original GPT-2 files are laid out."""
    if layout == "save_pretrained":
        model.save_pretrained(folder)
        assert (folder / WEIGHTS_FILE).is_file()
    elif layout == "sharded":
        model.save_pretrained(folder, max_shard_size=400)
        assert (folder / INDEX_FILE).is_file() and not (folder / WEIGHTS_FILE).exists()
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    else:  # no "transformer." prefix, and the causal-mask buffers stored beside the weights
        model.config.save_pretrained(folder)
        n = model.config.n_positions
        tensors = {k.removeprefix("transformer."): v for k, v in hf_tensors(model).items()}
        for i in range(model.config.n_layer):
            tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.float32))[None, None]
            tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def logits(model: GPT2LMHeadModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@hf_examples
@given(config=gpt2_configs(), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_read_gpt2_computes_transformers_logits_and_writes_the_same_tensors(config, layout, seed, tmp_path_factory):
    model = hf_model(config, seed)
    folder = tmp_path_factory.mktemp("gpt2") / "in"
    save(model, folder, layout)
    spec, w = read_gpt2(folder)
    d_ff = config["n_inner"] or 4 * config["n_embd"]
    assert (spec.d_model, spec.n_heads, spec.n_layers, spec.d_ff, spec.vocab_size, spec.max_len) == (
        config["n_embd"], config["n_head"], config["n_layer"], d_ff, config["vocab_size"], config["n_positions"])
    assert spec.tie_embeddings is config["tie_word_embeddings"] and spec.layer_norm_epsilon == config["layer_norm_epsilon"]
    assert all(a.dtype == np.float32 for a in w.values())

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, spec.vocab_size, size=(2, int(rng.integers(1, spec.max_len + 1))))
    assert_logits_close(reference.forward(spec, w, ids), logits(model, ids))

    # Read then write: the checkpoint save_pretrained writes, tensor by tensor, whatever the layout read.
    out = folder.parent / "out"
    write_gpt2(spec, w, out)
    written, original = load_file(str(out / WEIGHTS_FILE)), hf_tensors(model)
    assert sorted(written) == sorted(original)
    assert all(written[k].dtype == np.float32 and np.array_equal(written[k], original[k]) for k in original)
    if layout == "save_pretrained":
        stored = load_file(str(folder / WEIGHTS_FILE))
        assert sorted(stored) == sorted(written) and all(np.array_equal(stored[k], written[k]) for k in stored)
    back = json.loads((out / CONFIG_FILE).read_text())
    assert {k: back[k] for k in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size", "tie_word_embeddings")} == {
        k: config[k] for k in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size", "tie_word_embeddings")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_read_as_float32(dtype, tmp_path):
    model = hf_model(dict(n_embd=12, n_head=3, n_layer=2, vocab_size=17, n_positions=6), seed=1).to(dtype)
    model.save_pretrained(tmp_path / "in")
    spec, w = read_gpt2(tmp_path / "in")
    assert all(a.dtype == np.float32 for a in w.values())
    write_gpt2(spec, w, tmp_path / "out")
    written, upcast = load_file(str(tmp_path / "out" / WEIGHTS_FILE)), hf_tensors(model)
    assert sorted(written) == sorted(upcast)
    assert all(np.array_equal(written[k], upcast[k]) for k in upcast), "the read is not the exact upcast"
    ids = np.array([[1, 5, 16, 0, 3, 3]])
    assert_logits_close(reference.forward(spec, w, ids), logits(model.float(), ids))


# --- matta checkpoints in transformers, with matta out of reach -------------------------------

#: The start of a child process's code: from here on, ``import matta`` fails.
NO_MATTA = textwrap.dedent(
    """
    import json, sys
    sys.modules["matta"] = None  # the child must not be able to import matta
    try:
        import matta  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("matta is importable in the child")
    """
)


def run_without_matta(code: str, *args: str, cwd: Path) -> None:
    """Runs ``NO_MATTA + code`` in a child Python with ``args``, offline and without PYTHONPATH; fails on an error."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", NO_MATTA + code, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


_CHILD = textwrap.dedent(
    """
    import numpy as np, torch
    from transformers import AutoModelForCausalLM

    cases = json.load(open(sys.argv[1]))
    out = {}
    for name, case in cases.items():
        model = AutoModelForCausalLM.from_pretrained(case["folder"]).eval()
        assert type(model).__name__ == "GPT2LMHeadModel", type(model)
        with torch.no_grad():
            out[name] = model(torch.tensor(np.load(case["ids"]))).logits.float().numpy()
    np.savez(sys.argv[2], **out)
    """
)


def test_written_checkpoints_load_in_transformers_without_matta(tmp_path):
    ta = Transformer(vocab_size=23, max_len=8, d_model=16, n_layers=3, n_heads=4, d_ff=32)   # d_head 4
    w = weights_for(ta, seed=0, dtype="float32", scale=0.5)
    tied = replace(ta, tie_embeddings=True)
    w_tied = {k: v for k, v in w.items() if k != "head.kernel"}
    cases = {  # name: (full spec, its weights, granularity, pad)
        "depth": (ta, w, {"layers": [0, 2]}, False),
        "uniform-d_ff": (ta, w, 0.5, False),
        "heads-with-d_model": (ta, w, {"d_model": 8, "n_heads": 2}, False),
        "mixnmatch-padded": (ta, w, {"n_heads": [1, 4, 2], "d_ff": [8, 32, 16]}, True),
        "tied-student": (tied, w_tied, {"d_model": 12, "n_heads": 3, "n_layers": 2}, False),
    }
    rng = np.random.default_rng(0)
    listing, expected = {}, {}
    for name, (spec, weights, g, pad) in cases.items():
        sub, sub_w = extract(weights, spec, g)
        folder = tmp_path / name
        write_gpt2(sub, sub_w, folder, pad=pad)
        ids = rng.integers(0, spec.vocab_size, size=(3, spec.max_len))
        np.save(tmp_path / f"{name}-ids.npy", ids)
        listing[name] = {"folder": str(folder), "ids": str(tmp_path / f"{name}-ids.npy")}
        expected[name] = reference.forward(spec, weights, ids, g)   # the TA's nested sub-network at g
    (tmp_path / "cases.json").write_text(json.dumps(listing))
    run_without_matta(_CHILD, str(tmp_path / "cases.json"), str(tmp_path / "out.npz"), cwd=tmp_path)
    got = np.load(tmp_path / "out.npz")
    assert sorted(got.files) == sorted(cases)
    for name in cases:
        assert_logits_close(got[name], expected[name])
    padded = json.loads((tmp_path / "mixnmatch-padded" / CONFIG_FILE).read_text())
    assert (padded["n_head"], padded["n_inner"]) == (4, 32)


# --- padding and refusals (matta alone) --------------------------------------------------------


@core_examples
@given(spec=transformers(tied=None), seed=st.integers(0, 2**16))
def test_padding_to_a_gpt2_computes_the_same_function(spec, seed, tmp_path_factory):
    assume(spec.d_model % spec.d_head == 0 and max(spec.heads_per_layer) * spec.d_head <= spec.d_model)
    w = weights_for(spec, seed)   # float64
    folder = tmp_path_factory.mktemp("pad") / "gpt2"
    write_gpt2(spec, w, folder, pad=True)
    back, back_w = read_gpt2(folder)
    n_head = spec.d_model // spec.d_head
    assert (back.n_heads, back.d_ff, back.d_head) == (n_head, max(spec.ff_per_layer), spec.d_head)
    assert back.tie_embeddings is spec.tie_embeddings and all(a.dtype == np.float64 for a in back_w.values())
    x = np.random.default_rng(seed).integers(0, spec.vocab_size, size=(2, spec.max_len))
    np.testing.assert_allclose(reference.forward(back, back_w, x), reference.forward(spec, w, x), rtol=1e-10, atol=1e-10)
    for i, (h, ff) in enumerate(zip(spec.heads_per_layer, spec.ff_per_layer)):
        b = f"blocks.{i}"
        # The padding is zeros, appended after the spec's own heads and units.
        assert not back_w[f"{b}.attention.value.kernel"][:, h * spec.d_head:].any()
        assert not back_w[f"{b}.attention.output.kernel"][h * spec.d_head:].any()
        assert not back_w[f"{b}.ffn.up.kernel"][:, ff:].any() and not back_w[f"{b}.ffn.down.kernel"][ff:].any()
        assert np.array_equal(back_w[f"{b}.ffn.up.kernel"][:, :ff], w[f"{b}.ffn.up.kernel"])
    if back.num_params == spec.num_params:   # a GPT-2 already: written and read back unchanged
        assert replace(back, nested=spec.nested, multiple_of=spec.multiple_of) == spec
        assert all(np.array_equal(back_w[k], w[k]) for k in w)


NOT_GPT2 = [  # (spec fields, message, whether pad=True fixes it)
    (dict(d_model=8, n_heads=(1, 2), d_head=4), "Transformer.n_heads is per block", True),
    (dict(d_model=8, n_heads=2, d_ff=(4, 8)), "Transformer.d_ff is per block", True),
    (dict(d_model=8, n_heads=1, d_head=4), r"Transformer.d_head \* n_heads = 4 \* 1 != d_model=8", True),
    (dict(d_model=6, n_heads=1, d_head=4), "Transformer.d_head=4 must divide d_model=6", False),
    (dict(d_model=4, n_heads=2, d_head=4), r"Transformer.n_heads=2 with d_head=4 is wider than d_model=4", False),
]


@pytest.mark.parametrize("fields, message, pad_fixes", NOT_GPT2, ids=[m.split(" ")[0] + str(i) for i, (_, m, _) in enumerate(NOT_GPT2)])
def test_a_spec_that_is_not_a_gpt2_is_refused_naming_the_field(fields, message, pad_fixes, tmp_path):
    spec = Transformer(vocab_size=7, max_len=4, n_layers=2, **fields)
    w = initial_weights(spec, 0)
    with pytest.raises(SpecError, match=message):
        write_gpt2(spec, w, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    if pad_fixes:
        write_gpt2(spec, w, tmp_path / "out", pad=True)
        assert read_gpt2(tmp_path / "out")[0].num_params > spec.num_params
    else:
        with pytest.raises(SpecError, match=message):
            write_gpt2(spec, w, tmp_path / "out", pad=True)


def test_an_mlp_and_bad_options_are_refused(tmp_path):
    mlp = MLP(d_in=3, hidden=[4], d_out=2)
    with pytest.raises(SpecError, match="write_gpt2 writes a Transformer"):
        write_gpt2(mlp, initial_weights(mlp), tmp_path / "out")
    spec = Transformer(vocab_size=7, max_len=4, d_model=8, n_layers=1, n_heads=2)
    for option in ("pad", "overwrite"):
        with pytest.raises(OptionError, match=f"write_gpt2 {option} must be True or False; got 'yes'"):
            write_gpt2(spec, initial_weights(spec), tmp_path / "out", **{option: "yes"})
    assert not (tmp_path / "out").exists()


def _gpt2_folder(tmp_path: Path, **fields) -> Path:
    spec = Transformer(**{**dict(vocab_size=7, max_len=4, d_model=8, n_layers=2, n_heads=2), **fields})
    return Path(write_gpt2(spec, initial_weights(spec, 0), tmp_path / "ckpt"))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


UNFAITHFUL = [
    ("activation_function", "gelu", "'gelu_new'"),
    ("activation_function", "relu", "'gelu_new'"),
    ("scale_attn_by_inverse_layer_idx", True, "False"),
    ("reorder_and_upcast_attn", True, "False"),
    ("add_cross_attention", True, "False"),
    ("scale_attn_weights", False, "True"),
    ("model_type", "gpt_neox", "'gpt2'"),
    ("n_embd", "8", ">= 1"),
    ("layer_norm_epsilon", 0, r"\(0, 1\)"),
]


@pytest.mark.parametrize("field, value, allowed", UNFAITHFUL, ids=[f"{f}={v}" for f, v, _ in UNFAITHFUL])
def test_configs_matta_cannot_compute_are_refused_naming_field_and_allowed_values(field, value, allowed, tmp_path):
    folder = _gpt2_folder(tmp_path)
    read_gpt2(folder)
    _edit_config(folder, **{field: value})
    with pytest.raises(SpecError, match=rf"config\.json {field} must .*{allowed}.*; got {value!r}"):
        read_gpt2(folder)


def test_a_head_count_that_does_not_divide_n_embd_is_refused(tmp_path):
    folder = _gpt2_folder(tmp_path)
    _edit_config(folder, n_head=3)
    with pytest.raises(SpecError, match=r"config\.json n_head must divide n_embd .*n_embd=8, n_head=3"):
        read_gpt2(folder)


def _rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def test_missing_files_and_tensors_are_format_errors(tmp_path):
    with pytest.raises(FormatError, match="no such directory"):
        read_gpt2(tmp_path / "nothing")
    folder = _gpt2_folder(tmp_path)
    (folder / CONFIG_FILE).rename(tmp_path / "config.json.bak")
    with pytest.raises(FormatError, match="config.json is missing"):
        read_gpt2(folder)
    (tmp_path / "config.json.bak").rename(folder / CONFIG_FILE)

    _rewrite_weights(folder, lambda t: t.pop("transformer.h.1.ln_2.bias"))
    with pytest.raises(FormatError, match=r"missing \['h.1.ln_2.bias'\], unexpected \[\]"):
        read_gpt2(folder)
    _rewrite_weights(folder, lambda t: t.update({"transformer.h.1.ln_2.bias": np.zeros(8, np.float32),
                                                  "transformer.h.0.adapter.weight": np.zeros(2, np.float32)}))
    with pytest.raises(FormatError, match=r"missing \[\], unexpected \['h.0.adapter.weight'\]"):
        read_gpt2(folder)
    _rewrite_weights(folder, lambda t: t.update({"h.0.adapter.weight": t.pop("transformer.h.0.adapter.weight"),
                                                  "wte.weight": t["transformer.wte.weight"]}))
    with pytest.raises(FormatError, match="'wte.weight' is stored twice"):
        read_gpt2(folder)
    _rewrite_weights(folder, lambda t: [t.pop("wte.weight"), t.pop("h.0.adapter.weight")])
    read_gpt2(folder)

    _edit_config(folder, n_positions=5)
    with pytest.raises(FormatError, match=r"'wpe.weight' must have shape \(5, 8\) for config.json; got \(4, 8\)"):
        read_gpt2(folder)
    _edit_config(folder, n_positions=4)

    (folder / WEIGHTS_FILE).rename(folder / "pytorch_model.bin")
    with pytest.raises(FormatError, match="pytorch_model.bin is a pickle, which matta never loads"):
        read_gpt2(folder)


def test_damaged_and_hostile_weight_files_are_format_errors(tmp_path):
    folder = _gpt2_folder(tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    for damaged, message in [
        (data[: len(data) - 7], "lies outside the file"),
        (data[:5], "bad header length"),
        ((2**40).to_bytes(8, "little") + data[8:], "bad header length"),
        (data[:8] + b"x" + data[9:], "header is not JSON"),
    ]:
        (folder / WEIGHTS_FILE).write_bytes(damaged)
        with pytest.raises(FormatError, match=message):
            read_gpt2(folder)
    (folder / WEIGHTS_FILE).write_bytes(data)
    _rewrite_weights(folder, lambda t: t.update({"transformer.wte.weight": t["transformer.wte.weight"].astype(np.int32)}))
    with pytest.raises(FormatError, match="dtype 'I32'"):
        read_gpt2(folder)

    (folder / WEIGHTS_FILE).write_bytes(data)
    (folder / WEIGHTS_FILE).rename(folder / "model-1.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model-1.safetensors" for k in load_file(str(folder / "model-1.safetensors"))}}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    read_gpt2(folder)
    index["weight_map"]["transformer.wte.weight"] = "../model-1.safetensors"
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FormatError, match="shards must be plain file names"):
        read_gpt2(folder)
    index["weight_map"]["transformer.wte.weight"] = "model-2.safetensors"
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FormatError, match="the shard model-2.safetensors that .* lists is missing"):
        read_gpt2(folder)


# --- the write is atomic -----------------------------------------------------------------------


def test_write_never_leaves_half_a_checkpoint(tmp_path, monkeypatch):
    spec = Transformer(vocab_size=7, max_len=4, d_model=8, n_layers=1, n_heads=2)
    w = initial_weights(spec, 0)
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    with pytest.raises(FormatError, match="exists and is not empty; pass overwrite=True"):
        write_gpt2(spec, w, target)
    assert sorted(p.name for p in target.iterdir()) == ["tokenizer.json"]

    from matta import saving

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saving.SaveFolder, "write_weights", fail)  # the weights file, written after config.json
    with pytest.raises(OSError, match="disk full"):
        write_gpt2(spec, w, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "a temporary folder was left behind"
    assert sorted(p.name for p in target.iterdir()) == ["tokenizer.json"], "the old folder was touched"
    with pytest.raises(OSError, match="disk full"):
        write_gpt2(spec, w, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()

    write_gpt2(spec, w, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert read_gpt2(target)[0] == spec


def test_a_written_checkpoint_honours_the_umask(tmp_path):
    spec = Transformer(vocab_size=7, max_len=4, d_model=8, n_layers=1, n_heads=2)
    old = os.umask(0o022)
    try:
        target = Path(write_gpt2(spec, initial_weights(spec, 0), tmp_path / "ckpt"))
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(os.lstat(p).st_mode) for p in [target, *target.iterdir()]} == {
        "ckpt": 0o755, CONFIG_FILE: 0o644, WEIGHTS_FILE: 0o644}


def test_matta_hf_imports_neither_transformers_nor_a_framework():
    code = ("import sys, matta.hf\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'torch', 'tensorflow', 'keras', 'jax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def _resident_file_bytes() -> int:
    """This process's resident pages that map files (``RssFile`` of ``/proc/self/status``)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile and MADV_PAGEOUT are Linux's")
def test_extract_hands_back_the_pages_of_a_mapped_checkpoint(tmp_path):
    # A checkpoint of ~50 MB whose Student is a quarter of d_ff: extraction touches all of the
    # embeddings and attention and a page of every c_fc row; none of it stays resident after.
    spec = Transformer(vocab_size=2048, d_model=256, n_heads=4, n_layers=4, d_ff=4096, max_len=64, tie_embeddings=True)
    write_gpt2(spec, initial_weights(spec, seed=0), tmp_path / "ta")
    _, weights = read_gpt2(tmp_path / "ta")
    before = _resident_file_bytes()
    weights["blocks.0.ffn.up.kernel"][0, 0] = 7.0  # a copy-on-write page: its value must survive
    original = np.array(weights["blocks.1.ffn.up.kernel"][:, :5])
    sub, student = extract(weights, spec, {"d_ff": 0.25})
    mapped = os.path.getsize(tmp_path / "ta" / WEIGHTS_FILE)
    assert _resident_file_bytes() - before < 0.05 * mapped
    # The TA reads the same values afterwards (its pages load again) and the Student has copies.
    assert weights["blocks.0.ffn.up.kernel"][0, 0] == 7.0 == student["blocks.0.ffn.up.kernel"][0, 0]
    np.testing.assert_array_equal(weights["blocks.1.ffn.up.kernel"][:, :5], original)
    np.testing.assert_array_equal(student["blocks.1.ffn.up.kernel"][:, :5], original)
    assert sub.num_params == sum(a.size for a in student.values())
