"""GPT-2 checkpoints in and out: the folder layout of ``transformers``' ``save_pretrained``.

:func:`read_gpt2` turns a GPT-2 checkpoint (``config.json`` plus ``model.safetensors``
or a sharded ``model.safetensors.index.json``) into a :class:`~matta.specs.Transformer`
spec and weights in rule P2 layout; :func:`write_gpt2` writes a matta Transformer
back as a checkpoint that ``transformers.AutoModelForCausalLM.from_pretrained``
loads. GPT-2's ``Conv1D`` weights are ``(in, out)``, matta's kernel layout, and
``c_attn`` is ``[query | key | value]``, each head-major, so the mapping only
renames, splits ``c_attn`` in three and transposes an untied ``lm_head`` (the
table is in ``docs/gpt2.md``). A tied GPT-2 is a spec with ``tie_embeddings``
(rule P3).

This module needs numpy only: it never imports a deep-learning framework or
``transformers``, and it reads and writes the safetensors format itself (numpy has
no bfloat16; the write streams tensor by tensor). Nothing is unpickled: a ``pytorch_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from matta import saving
from matta.errors import FormatError, OptionError, SaveError, SpecError, choice, integer
from matta.specs import Transformer, check_spec
from matta.weights import check_weights

__all__ = ["read_gpt2", "write_gpt2", "check_gpt2", "teacher", "tokenizer_files", "CONFIG_FILE", "WEIGHTS_FILE", "INDEX_FILE",
           "TOKENIZER_FILES"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: The tokenizer files of a checkpoint folder that :func:`write_gpt2` copies with ``tokenizer_from``.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
PREFIX = "transformer."  # what save_pretrained puts before every key but lm_head's

#: GPT-2 config fields whose other values change the function matta computes, with the value
#: matta computes (and the GPT2Config default where the field is absent).
FAITHFUL = {
    "activation_function": "gelu_new",  # matta's gelu (tanh form)
    "scale_attn_weights": True,  # scores / sqrt(d_head)
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}

# (GPT-2 name, matta name) of the tensors that map one to one; blocks use the "h.{i}." prefix.
_TOP = (("wte.weight", "embed.tokens"), ("wpe.weight", "embed.positions"),
        ("ln_f.weight", "final_norm.scale"), ("ln_f.bias", "final_norm.offset"))
_BLOCK = (("ln_1.weight", "norm1.scale"), ("ln_1.bias", "norm1.offset"),
          ("attn.c_proj.weight", "attention.output.kernel"), ("attn.c_proj.bias", "attention.output.bias"),
          ("ln_2.weight", "norm2.scale"), ("ln_2.bias", "norm2.offset"),
          ("mlp.c_fc.weight", "ffn.up.kernel"), ("mlp.c_fc.bias", "ffn.up.bias"),
          ("mlp.c_proj.weight", "ffn.down.kernel"), ("mlp.c_proj.bias", "ffn.down.bias"))
_QKV = ("query", "key", "value")  # the column order of c_attn, each head-major
_BUFFERS = ("attn.bias", "attn.masked_bias")  # the causal-mask buffers of the original GPT-2 files

# safetensors dtype -> (numpy dtype of the stored bytes, itemsize)
_STORED = {"F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}
_MAX_HEADER = 100 * 2**20

PathLike = Union[str, "os.PathLike[str]"]


# --- reading -------------------------------------------------------------------------------


def read_gpt2(path: PathLike) -> tuple[Transformer, dict[str, np.ndarray]]:
    """Reads a GPT-2 checkpoint folder into a matta spec and weights.

    Accepts what ``save_pretrained`` writes (one ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``), keys with or without the ``transformer.`` prefix, and
    the original GPT-2 files' ``attn.bias``/``attn.masked_bias`` buffers (skipped). float16
    and bfloat16 become float32; float64 stays float64 (then every tensor is float64).

    Args:
        path: the checkpoint folder.

    Returns:
        ``(spec, weights)``: a :class:`~matta.specs.Transformer` (``tie_embeddings`` from
        ``tie_word_embeddings``, rule P3) and its weights in rule P2 layout.

    Raises:
        SpecError: the config asks for a model matta does not compute (naming the field and
            the values allowed).
        FormatError: a file or tensor is missing, unexpected, damaged or of the wrong shape.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FormatError(f"{folder!r} is not a GPT-2 checkpoint folder (no such directory)")
    spec = _spec_from_config(_read_json(os.path.join(folder, CONFIG_FILE)))
    strip = lambda key: key[len(PREFIX):] if key.startswith(PREFIX) else key  # noqa: E731
    stored = _read_checkpoint_tensors(folder, keep=lambda key: not _ignored(spec, strip(key)))
    tensors: dict[str, np.ndarray] = {}
    for key, array in stored.items():
        if strip(key) in tensors:
            raise FormatError(f"{folder}: tensor {strip(key)!r} is stored twice (with and without {PREFIX!r})")
        tensors[strip(key)] = array
    expected = _gpt2_shapes(spec)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise FormatError(
            f"{folder}: the tensors do not match config.json's GPT-2: missing {missing[:5]}"
            f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise FormatError(f"{folder}: tensor {key!r} must have shape {shape} for config.json; got {tensors[key].shape}")
    dtype = np.float64 if any(tensors[k].dtype == np.float64 for k in expected) else np.float32
    tensors = {k: tensors[k].astype(dtype, copy=False) for k in expected}
    return spec, check_weights(spec, _to_matta(spec, tensors))


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FormatError(f"{os.path.dirname(path)!r} is not a GPT-2 checkpoint: {os.path.basename(path)} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from None


def _spec_from_config(config: Any) -> Transformer:
    """The Transformer a GPT-2 ``config.json`` describes, or a SpecError naming the field matta cannot compute."""
    if not isinstance(config, Mapping):
        raise FormatError(f"config.json must hold a JSON object; got {type(config).__name__}")
    choice("config.json model_type", config.get("model_type"), ("gpt2",), SpecError)
    for field, value in FAITHFUL.items():
        choice(f"config.json {field}", config.get(field, value), (value,), SpecError)

    def size(field: str, default: Any = None) -> int:
        return integer(f"config.json {field}", config.get(field, default), 1, SpecError)

    n_embd, n_head = size("n_embd"), size("n_head")
    if n_embd % n_head:
        raise SpecError(f"config.json n_head must divide n_embd (a GPT-2 head is n_embd / n_head wide); "
                        f"got n_embd={n_embd}, n_head={n_head}")
    n_inner = config.get("n_inner")
    tie = config.get("tie_word_embeddings", True)
    choice("config.json tie_word_embeddings", tie, (True, False), SpecError)
    eps = config.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise SpecError(f"config.json layer_norm_epsilon must be a number in (0, 1); got {eps!r}")
    return Transformer(
        vocab_size=size("vocab_size"),
        max_len=size("n_positions", config.get("n_ctx")),
        d_model=n_embd,
        n_layers=size("n_layer"),
        n_heads=n_head,
        d_ff=4 * n_embd if n_inner is None else size("n_inner"),
        d_head=n_embd // n_head,
        layer_norm_epsilon=float(eps),
        tie_embeddings=tie,
    )


def _read_checkpoint_tensors(folder: str, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """The tensors named ``keep`` of the folder's safetensors file, or of the shards its index lists."""
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, INDEX_FILE)
    if os.path.isfile(single):
        return _read_safetensors(single, keep)
    if os.path.isfile(index):
        listing = _read_json(index)
        weight_map = listing.get("weight_map") if isinstance(listing, Mapping) else None
        if not isinstance(weight_map, Mapping) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FormatError(f"{index} must map every tensor name to a shard file in 'weight_map'")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if os.path.basename(shard) != shard or shard.startswith("."):
                raise FormatError(f"{index} names the shard {shard!r}; shards must be plain file names in the folder")
            if not os.path.isfile(os.path.join(folder, shard)):
                raise FormatError(f"{folder!r}: the shard {shard} that {INDEX_FILE} lists is missing")
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            shard_path = os.path.join(folder, shard)
            for key, array in _read_safetensors(shard_path, lambda k, s=shard: weight_map.get(k) == s and keep(k)).items():
                out[key] = array
        unread = sorted(k for k in weight_map if k not in out and keep(k))
        if unread:
            raise FormatError(f"{folder!r}: tensors {unread[:5]} listed in {INDEX_FILE} are in no shard")
        return out
    pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.exists(os.path.join(folder, n))]
    raise FormatError(
        f"{folder!r} is not a GPT-2 checkpoint matta reads: {WEIGHTS_FILE} and {INDEX_FILE} are missing"
        + (f" ({pickled[0]} is a pickle, which matta never loads; re-save with save_pretrained, "
           "which writes safetensors)" if pickled else "")
    )


def _read_safetensors(path: str, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """The tensors named ``keep`` of a safetensors file as numpy arrays; float16 and bfloat16 become float32.

    float32 and float64 tensors are copy-on-write memory maps of the file (writable; a write
    changes the array, never the file). The header is read here (8-byte little-endian length, then JSON) so that bfloat16, which
    numpy lacks, is read from its raw bytes: the top 16 bits of a float32.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise FormatError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{path} is not a safetensors file (the header is not JSON)") from None
        if not isinstance(header, dict):
            raise FormatError(f"{path} is not a safetensors file (the header is not a JSON object)")
        start, out = 8 + n, {}
        for key, info in header.items():
            if key == "__metadata__" or not keep(key):
                continue
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise FormatError(f"{path}: tensor {key!r} has a malformed header entry") from None
            if dtype not in _STORED:
                raise FormatError(f"{path}: tensor {key!r} has dtype {dtype!r}; matta reads {sorted(_STORED)}")
            stored, itemsize = _STORED[dtype]
            if not all(isinstance(s, int) and s >= 0 for s in shape) or not all(
                isinstance(o, int) for o in (begin, end)
            ):
                raise FormatError(f"{path}: tensor {key!r} has a malformed shape or offsets")
            count = int(np.prod(shape, dtype=np.int64))
            if end - begin != count * itemsize or not 0 <= begin <= end <= size - start:
                raise FormatError(f"{path}: tensor {key!r} lies outside the file or has the wrong byte size")
            if count and dtype in ("F32", "F64"):
                # Mapped copy-on-write, not read: a tensor's pages load when something reads them, so
                # extracting a Student touches little more than the Student's share of the file.
                out[key] = np.memmap(path, dtype=stored, mode="c", offset=start + begin, shape=shape).view(np.ndarray)
                continue
            f.seek(start + begin)
            array = np.fromfile(f, dtype=stored, count=count).reshape(shape)
            if dtype == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            out[key] = array.astype(np.float64 if dtype == "F64" else np.float32, copy=False)
        return out


def _ignored(spec: Transformer, name: str) -> bool:
    """Stored tensors a faithful read skips: mask buffers, and a tied model's copy of its head."""
    if name == "lm_head.weight":
        return spec.tie_embeddings  # transformers ties it to wte as well
    parts = name.split(".", 2)
    return len(parts) == 3 and parts[0] == "h" and parts[1].isdigit() and parts[2] in _BUFFERS


# --- the mapping ---------------------------------------------------------------------------


def _gpt2_shapes(spec: Transformer) -> dict[str, tuple[int, ...]]:
    """GPT-2's tensor names (no prefix) and shapes for a uniform ``spec``."""
    params = {k: p.shape for k, p in spec.parameters().items()}
    out = {gpt2: params[name] for gpt2, name in _TOP}
    for i in range(spec.n_layers):
        for gpt2, name in _BLOCK:
            out[f"h.{i}.{gpt2}"] = params[f"blocks.{i}.{name}"]
        inner = params[f"blocks.{i}.attention.query.bias"][0]
        out[f"h.{i}.attn.c_attn.weight"] = (spec.d_model, 3 * inner)
        out[f"h.{i}.attn.c_attn.bias"] = (3 * inner,)
    if not spec.tie_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, spec.d_model)
    return out


def _to_matta(spec: Transformer, t: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    w = {name: t[gpt2] for gpt2, name in _TOP}
    for i in range(spec.n_layers):
        w.update({f"blocks.{i}.{name}": t[f"h.{i}.{gpt2}"] for gpt2, name in _BLOCK})
        # Column views of c_attn, not copies: whoever needs them contiguous copies (extraction, backends).
        kernels = np.split(t[f"h.{i}.attn.c_attn.weight"], 3, axis=1)
        biases = np.split(t[f"h.{i}.attn.c_attn.bias"], 3)
        for proj, kernel, bias in zip(_QKV, kernels, biases):
            w[f"blocks.{i}.attention.{proj}.kernel"] = kernel
            w[f"blocks.{i}.attention.{proj}.bias"] = bias
    if not spec.tie_embeddings:
        w["head.kernel"] = np.ascontiguousarray(t["lm_head.weight"].T)
    return {k: w[k] for k in spec.parameters()}


def _to_gpt2(spec: Transformer, w: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = {PREFIX + gpt2: w[name] for gpt2, name in _TOP}
    for i in range(spec.n_layers):
        b, h = f"blocks.{i}", f"{PREFIX}h.{i}"
        t.update({f"{h}.{gpt2}": w[f"{b}.{name}"] for gpt2, name in _BLOCK})
        t[f"{h}.attn.c_attn.weight"] = np.concatenate([w[f"{b}.attention.{p}.kernel"] for p in _QKV], axis=1)
        t[f"{h}.attn.c_attn.bias"] = np.concatenate([w[f"{b}.attention.{p}.bias"] for p in _QKV])
    if not spec.tie_embeddings:
        t["lm_head.weight"] = w["head.kernel"].T  # the head stays outside the prefix, as save_pretrained writes it
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


# --- writing -------------------------------------------------------------------------------


def write_gpt2(
    spec: Transformer, weights: Mapping[str, np.ndarray], path: PathLike, *, pad: bool = False, overwrite: bool = False,
    tokenizer_from: Optional[PathLike] = None,
) -> str:
    """Writes a matta Transformer as a GPT-2 checkpoint folder that ``transformers`` loads.

    The folder holds ``config.json`` and ``model.safetensors`` (keys with the ``transformer.``
    prefix, a tied head left out, as ``save_pretrained`` writes them). It is written with
    :func:`matta.saving.atomic_folder` (rule E6): into a temporary folder beside ``path`` that
    then replaces it in one step, so ``path`` never holds half a checkpoint.

    A GPT-2 has one ``n_head`` and one ``n_inner`` and heads ``n_embd / n_head`` wide. A spec
    with per-block ``n_heads`` or ``d_ff``, or with ``d_head * n_heads != d_model``, is refused
    unless ``pad`` is set: then every block is zero-padded to ``d_model / d_head`` heads and to
    the largest ``d_ff``. A zero FFN unit adds ``gelu(0) = 0``; a zero head has zero values and
    a zero output projection, so it adds 0: the padded model computes the same function
    (up to the summation order of the longer dot products), at a larger size.

    Args:
        spec: a Transformer spec.
        weights: its weights (rule P2 layout, float32 or float64).
        path: the folder to write.
        pad: zero-pad per-block sizes and missing heads to a uniform GPT-2.
        overwrite: replace an existing non-empty folder, a file or a symlink (never followed)
            at ``path`` (else that is an error).
        tokenizer_from: a checkpoint folder whose tokenizer files (:data:`TOKENIZER_FILES`,
            whichever exist) are copied into ``path``, and whose ``config.json``
            ``bos_token_id``/``eos_token_id`` are kept when they lie inside the vocabulary.

    Returns:
        ``path``.

    Raises:
        SpecError: the spec is not a GPT-2 (naming the field), and ``pad`` cannot or may not fix it.
        FormatError: ``path`` exists and is not an empty folder, and ``overwrite`` is not set.
        SaveError: writing failed (e.g. a full disk); the old ``path`` is then unchanged.
    """
    spec = check_spec(spec)
    if not isinstance(spec, Transformer):
        raise SpecError(f"write_gpt2 writes a Transformer spec; got {type(spec).__name__}")
    choice("write_gpt2 pad", pad, (True, False), OptionError)
    choice("write_gpt2 overwrite", overwrite, (True, False), OptionError)
    try:
        saving.check_target(path, overwrite=overwrite)
    except SaveError as exc:
        raise FormatError(exc.strerror) from None
    weights = check_weights(spec, weights)
    copied = {} if tokenizer_from is None else tokenizer_files(tokenizer_from)
    spec, weights = _as_gpt2(spec, weights, pad)
    tensors = _to_gpt2(spec, weights)
    dtype = next(iter(weights.values())).dtype.name
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": spec.vocab_size,
        "n_positions": spec.max_len,
        "n_embd": spec.d_model,
        "n_layer": spec.n_layers,
        "n_head": spec.heads_per_layer[0],
        "n_inner": spec.ff_per_layer[0],
        "layer_norm_epsilon": spec.layer_norm_epsilon,
        "tie_word_embeddings": spec.tie_embeddings,
        **FAITHFUL,
        # matta knows no tokenizer: GPT2Config's defaults (50256) would name a token outside a small vocabulary.
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": dtype,
    }
    source_config = None if tokenizer_from is None else os.path.join(os.fspath(tokenizer_from), CONFIG_FILE)
    if source_config is not None and os.path.isfile(source_config):
        source = _read_json(source_config)
        for field in ("bos_token_id", "eos_token_id"):
            value = source.get(field) if isinstance(source, Mapping) else None
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < spec.vocab_size:
                config[field] = value

    with saving.atomic_folder(path, overwrite=overwrite) as folder:
        folder.write_json(CONFIG_FILE, config)
        folder.write_weights(WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        for name, source_path in copied.items():
            with open(source_path, "rb") as f:
                folder.write_bytes(name, [f.read()])
    return os.fspath(path)


def tokenizer_files(path: PathLike) -> dict[str, str]:
    """``{file name: path}`` of the :data:`TOKENIZER_FILES` that exist in the checkpoint folder ``path``.

    Raises:
        FormatError: ``path`` is not a folder.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FormatError(f"{folder!r} is not a checkpoint folder (no such directory)")
    return {n: os.path.join(folder, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))}


# --- a checkpoint as a Teacher -------------------------------------------------------------


class Teacher:
    """A GPT-2 checkpoint as a Teacher: ``teacher(ids) -> logits``, batch by batch, on a matta backend.

    Built by :func:`teacher`; ``MatTA.fit(teacher=...)`` calls it on each batch of token ids.

    Attributes:
        spec: the checkpoint's spec.
        path: the checkpoint folder.
    """

    def __init__(self, spec: Transformer, weights: Mapping[str, np.ndarray], path: str, backend: Any,
                 device: Optional[str], batch_size: int):
        from matta.backend import get_backend

        self.spec, self.path, self.batch_size = spec, path, batch_size
        self.backend = get_backend(backend)
        self.model = self.backend.build_plain(spec, weights, device=device)

    def __call__(self, ids: Any) -> np.ndarray:
        """Logits ``(n, time, vocab_size)`` of the token ids ``(n, time)``.

        Raises:
            InputError: ``ids`` is not a 2-D array of ids below ``spec.vocab_size``, or is longer
                than ``spec.max_len``.
        """
        from matta.inputs import check_x

        x = check_x(self.spec, ids, "float32")
        parts = [self.backend.plain_forward(self.model, x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, x.shape[1], self.spec.vocab_size), np.float32)

    def __repr__(self) -> str:
        return f"Teacher({self.path!r}, num_params={self.spec.num_params}, backend={self.backend.name!r})"


def teacher(path: PathLike, backend: Any = "torch", *, device: Optional[str] = None, batch_size: int = 32) -> Teacher:
    """A GPT-2 checkpoint as a Teacher for ``MatTA.fit(teacher=...)`` (its logits; ``teacher_output="logits"``).

    The checkpoint is read by :func:`read_gpt2` and computed by the backend's plain model, ``batch_size``
    sequences at a time; ``transformers`` is not used.

    Args:
        path: the checkpoint folder.
        backend: the backend that computes it (the Students' own, usually).
        device: backend device string.
        batch_size: sequences per forward call.

    Raises:
        FormatError, SpecError: as :func:`read_gpt2`.
    """
    integer("batch_size", batch_size, 1)
    spec, weights = read_gpt2(path)
    return Teacher(spec, weights, os.fspath(path), backend, device, int(batch_size))


def check_gpt2(spec: Transformer) -> None:
    """Checks that :func:`write_gpt2` writes ``spec`` without ``pad``.

    Raises:
        SpecError: naming the field that is not a GPT-2's.
    """
    _as_gpt2(spec, {}, pad=False)  # without pad, a spec that passes is returned before any weight is read


def _as_gpt2(spec: Transformer, w: dict[str, np.ndarray], pad: bool) -> tuple[Transformer, dict[str, np.ndarray]]:
    """``spec`` and ``w`` as a uniform GPT-2 (zero-padded when ``pad``), or a SpecError naming the field."""
    heads, ffs, d, dh = spec.heads_per_layer, spec.ff_per_layer, spec.d_model, spec.d_head
    if d % dh:
        raise SpecError(f"Transformer.d_head={dh} must divide d_model={d} to export as GPT-2 "
                        "(a GPT-2 head is n_embd / n_head wide); padding cannot change d_model")
    n_head, n_inner = d // dh, max(ffs)
    if max(heads) > n_head:
        raise SpecError(f"Transformer.n_heads={spec.n_heads} with d_head={dh} is wider than d_model={d}: "
                        f"a GPT-2 has at most d_model / d_head = {n_head} heads; padding cannot remove heads")
    problems = []
    if len(set(heads)) > 1:
        problems.append(f"Transformer.n_heads is per block, {list(heads)}; a GPT-2 has one n_head")
    elif heads[0] != n_head:
        problems.append(f"Transformer.d_head * n_heads = {dh} * {heads[0]} != d_model={d}; "
                        "a GPT-2 head is n_embd / n_head wide")
    if len(set(ffs)) > 1:
        problems.append(f"Transformer.d_ff is per block, {list(ffs)}; a GPT-2 has one n_inner")
    if not problems:
        return spec, w
    if not pad:
        raise SpecError(f"{'; '.join(problems)}. pad=True zero-pads every block to {n_head} heads "
                        f"and d_ff={n_inner} (the same function, a larger model)")
    out = dict(w)
    for i, (h, ff) in enumerate(zip(heads, ffs)):
        b = f"blocks.{i}"
        for proj in _QKV:
            out[f"{b}.attention.{proj}.kernel"] = _zero_pad(w[f"{b}.attention.{proj}.kernel"], 1, n_head * dh)
            out[f"{b}.attention.{proj}.bias"] = _zero_pad(w[f"{b}.attention.{proj}.bias"], 0, n_head * dh)
        out[f"{b}.attention.output.kernel"] = _zero_pad(w[f"{b}.attention.output.kernel"], 0, n_head * dh)
        out[f"{b}.ffn.up.kernel"] = _zero_pad(w[f"{b}.ffn.up.kernel"], 1, n_inner)
        out[f"{b}.ffn.up.bias"] = _zero_pad(w[f"{b}.ffn.up.bias"], 0, n_inner)
        out[f"{b}.ffn.down.kernel"] = _zero_pad(w[f"{b}.ffn.down.kernel"], 0, n_inner)
    padded = replace(spec, n_heads=n_head, d_ff=n_inner)
    return padded, check_weights(padded, out)


def _zero_pad(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``a`` with zeros appended along ``axis`` up to ``size``."""
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return np.pad(a, widths)
