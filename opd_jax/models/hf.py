"""Hugging Face checkpoints: ``config.json`` plus safetensors (single file or sharded), both ways.

``from_pretrained`` builds the module abstractly (``nnx.eval_shape``, no random initialisation) and
fills it tensor by tensor, so an 8B checkpoint is read once, straight into the requested dtype. HF
stores one tensor per layer (``model.layers.3.mlp.up_proj.weight``); the decoder stacks them on a
leading layer axis (``layers/mlp/up[3]``), so loading writes each into its layer's slot of a
preallocated host array and export slices it back out.
``save_pretrained`` writes a folder that transformers' ``AutoModelForCausalLM.from_pretrained`` loads.

Folders may be local or in a bucket (``gs://``, :mod:`opd_jax.storage`). From a bucket nothing is
copied first: each tensor is read with a ranged read of its bytes (the offsets are in the
safetensors header), so a host reads only the tensors it loads.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save as save_bytes
from safetensors.flax import save_file

from opd_jax import storage
from opd_jax.errors import InputError, InputFileNotFoundError
from opd_jax.models.config import DecoderConfig
from opd_jax.models.decoder import Decoder

Array = jax.Array
Path = tuple[str | int, ...]


class TensorMapping(NamedTuple):
    """Where an HF tensor lives in the NNX state, and how its layout converts both ways.

    ``layer`` is the index on the leading layer axis of a stacked block parameter (``None`` for the
    embedding, final norm and LM head).
    """

    path: Path
    layer: int | None
    to_ours: Callable
    to_hf: Callable

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"

__all__ = ["TensorMapping", "checkpoint_dtype", "from_pretrained", "hf_tensor_map", "save_pretrained"]


def _identity(x):
    return x


def hf_tensor_map(config: DecoderConfig) -> dict[str, TensorMapping]:
    """HF tensor name -> its :class:`TensorMapping` (per-layer transforms act on one layer's slice)."""
    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size

    def projection_in(heads):  # HF [heads·H, D] <-> ours [D, heads, H]
        return (lambda w: w.reshape(heads, h, d).transpose(2, 0, 1), lambda w: w.transpose(1, 2, 0).reshape(heads * h, d))

    def bias_in(heads):
        return (lambda b: b.reshape(heads, h), lambda b: b.reshape(heads * h))

    transpose = (lambda w: w.T, lambda w: w.T)
    same = (_identity, _identity)
    names: dict[str, TensorMapping] = {
        "model.embed_tokens.weight": TensorMapping(("embedding",), None, *same),
        "model.norm.weight": TensorMapping(("final_norm", "weight"), None, *same),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = TensorMapping(("lm_head",), None, *transpose)
    for i in range(config.num_layers):
        layer = {
            "input_layernorm.weight": (("attention_norm", "weight"), *same),
            "post_attention_layernorm.weight": (("mlp_norm", "weight"), *same),
            "self_attn.q_proj.weight": (("attention", "q"), *projection_in(n)),
            "self_attn.k_proj.weight": (("attention", "k"), *projection_in(k)),
            "self_attn.v_proj.weight": (("attention", "v"), *projection_in(k)),
            "self_attn.o_proj.weight": (
                ("attention", "o"),
                lambda w: w.reshape(d, n, h).transpose(1, 2, 0),
                lambda w: w.transpose(2, 0, 1).reshape(d, n * h),
            ),
            "mlp.gate_proj.weight": (("mlp", "gate"), *transpose),
            "mlp.up_proj.weight": (("mlp", "up"), *transpose),
            "mlp.down_proj.weight": (("mlp", "down"), *transpose),
        }
        if config.qkv_bias:
            layer["self_attn.q_proj.bias"] = (("attention", "q_bias"), *bias_in(n))
            layer["self_attn.k_proj.bias"] = (("attention", "k_bias"), *bias_in(k))
            layer["self_attn.v_proj.bias"] = (("attention", "v_bias"), *bias_in(k))
        if config.o_bias:
            layer["self_attn.o_proj.bias"] = (("attention", "o_bias"), *same)
        if config.qk_norm:
            layer["self_attn.q_norm.weight"] = (("attention", "q_norm", "weight"), *same)
            layer["self_attn.k_norm.weight"] = (("attention", "k_norm", "weight"), *same)
        if config.mlp_bias:
            for proj, name in (("gate_proj", "gate_bias"), ("up_proj", "up_bias"), ("down_proj", "down_bias")):
                layer[f"mlp.{proj}.bias"] = (("mlp", name), *same)
        names.update({
            f"model.layers.{i}.{key}": TensorMapping(("layers", *path), i, *fns) for key, (path, *fns) in layer.items()
        })
    return names


def load_config(path: str | pathlib.Path) -> DecoderConfig:
    """The :class:`DecoderConfig` of a checkpoint folder; errors name the file and field.

    Raises:
      InputFileNotFoundError: the folder or its ``config.json`` does not exist.
      InputError: ``config.json`` is not a supported decoder configuration.
    """
    folder = storage.as_path(path)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise InputFileNotFoundError(f"{folder} {'is not a folder' if folder.exists() else 'does not exist'}")
    if not config_path.is_file():
        raise InputFileNotFoundError(f"no {CONFIG_FILE} in {folder} (expected {config_path})")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config_path}: not valid JSON ({error})") from None
    try:
        return DecoderConfig.from_hf(hf)
    except ValueError as error:
        raise InputError(f"{config_path}: {error}") from None


def check_weights(folder: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """HF tensor name -> the safetensors file holding it, every file's header read and its size
    checked against the header (a truncated copy is named before any tensor is read).

    Raises:
      InputFileNotFoundError: no weights, or a shard the index lists is missing.
      InputError: an index or a safetensors file that is damaged or truncated (named).
    """
    folder = storage.as_path(folder)
    index, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise InputError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map')") from None
        files = {name: folder / filename for name, filename in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise InputFileNotFoundError(f"{index} lists {file.name}, which is missing from {folder}")
            _safetensors_header(file)
        return files
    if single.is_file():
        return {name: single for name in _safetensors_header(single)}
    raise InputFileNotFoundError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}")


def _safetensors_header(file: pathlib.Path) -> dict:
    """The tensor entries of a safetensors file's header, after checking that the file holds every
    byte they describe. The format: an 8-byte little-endian header length, the JSON header, then the
    tensors' bytes at the header's ``data_offsets``."""
    size = storage.size(file)
    damaged = f"{file} is damaged or truncated ({size} bytes"
    advice = "); copy or export the folder again"
    with file.open("rb") as handle:
        prefix = handle.read(8)
        header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if header_bytes is None or 8 + header_bytes > size:
            raise InputError(f"{damaged}: too short for its header{advice}")
        try:
            header = json.loads(handle.read(header_bytes))
            tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
            data_bytes = max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError,
                IndexError):
            raise InputError(f"{damaged}: its header is not a safetensors header{advice}") from None
    if size != 8 + header_bytes + data_bytes:
        raise InputError(f"{damaged}, but its header describes {8 + header_bytes + data_bytes}{advice}")
    return tensors


_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "I64": np.int64,
                 "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_tensors(files: dict[str, pathlib.Path], names: list[str]) -> Iterator[tuple[str, Array]]:
    by_file: dict[pathlib.Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, file_names in by_file.items():
        if storage.is_remote(file):
            yield from _read_remote_tensors(file, file_names)
            continue
        # framework="flax": the numpy backend cannot represent bfloat16 tensors.
        with safe_open(file, framework="flax") as handle:
            for name in file_names:
                yield name, handle.get_tensor(name)


def _read_remote_tensors(file, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a safetensors object in a bucket, each by a ranged read of its own bytes
    (safetensors' readers need a local file; the format is a header and the bytes at its offsets)."""
    with file.open("rb") as handle:
        header_bytes = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_bytes))
        for name in names:
            entry = header[name]
            start, end = (int(offset) for offset in entry["data_offsets"])
            handle.seek(8 + header_bytes + start)
            dtype = _NUMPY_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise InputError(f"{file}: tensor {name} has dtype {entry['dtype']}, which opd-jax cannot read")
            yield name, np.frombuffer(handle.read(end - start), dtype).reshape(entry["shape"])


def from_pretrained(
    path: str | pathlib.Path, dtype=jnp.float32, *, compute_dtype=None, attention="auto", remat: str = "none"
) -> tuple[Decoder, DecoderConfig]:
    """Load a Qwen3 / Qwen2 / Llama checkpoint folder.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` or a sharded
        ``model.safetensors.index.json`` (float32, bfloat16 or float16 tensors).
      dtype: parameter dtype of the returned model.
      compute_dtype, attention, remat: as for :class:`Decoder` (compute dtype ``None``: ``dtype``).

    Returns:
      ``(model, config)``.

    Raises:
      FileNotFoundError: missing folder, ``config.json`` or weight files (named).
      ValueError: unsupported architecture; a missing tensor or a tensor of the wrong shape (named).
    """
    folder = storage.as_path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config = load_config(folder)
    files = check_weights(folder)
    expected = hf_tensor_map(config)
    missing = [name for name in expected if name not in files]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{folder}: missing tensor(s) {shown} for a {config.model_type} model")

    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), param_dtype=dtype, compute_dtype=compute_dtype,
                                                   attention=attention, remat=remat))
    graphdef, state = nnx.split(abstract)
    targets = {path: variable for path, variable in nnx.to_flat_state(state)}
    # Host buffers in the target dtype; a stacked parameter is filled one layer at a time.
    loaded = {path: np.empty(v.shape, v.dtype) for path, v in targets.items()}
    for name, tensor in _read_tensors(files, list(expected)):
        mapping = expected[name]
        slot_shape = targets[mapping.path].shape[1:] if mapping.layer is not None else targets[mapping.path].shape
        expected_shape = tuple(mapping.to_hf(np.empty(slot_shape, np.float32)).shape)
        if tuple(tensor.shape) != expected_shape:
            raise ValueError(
                f"{folder}: tensor {name} has shape {list(tensor.shape)}, but config.json implies "
                f"{list(expected_shape)}"
            )
        value = np.asarray(mapping.to_ours(jnp.asarray(tensor, dtype)))
        if mapping.layer is None:
            loaded[mapping.path] = value
        else:
            loaded[mapping.path][mapping.layer] = value
    nnx.replace_by_pure_dict(state, _nested({path: jnp.asarray(value) for path, value in loaded.items()}))
    return nnx.merge(graphdef, state), config


def _nested(flat: dict[Path, Array]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def save_pretrained(
    model: Decoder,
    config: DecoderConfig,
    path: str | pathlib.Path,
    *,
    dtype=None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write ``config.json``, ``generation_config.json`` and safetensors that transformers loads back.

    Args:
      model: the decoder.
      config: its configuration.
      path: output folder (created); existing weight files of the same names are replaced.
      dtype: tensor dtype on disk (default: the parameters' dtype).
      max_shard_bytes: if set, split the weights into ``model-0000i-of-0000n.safetensors`` files of
        at most this many bytes each plus ``model.safetensors.index.json``.
    """
    folder = storage.as_path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors: dict[str, Array] = {}
    for name, mapping in hf_tensor_map(config).items():
        value = state[mapping.path][...]
        if mapping.layer is not None:
            value = value[mapping.layer]
        tensors[name] = jnp.asarray(mapping.to_hf(value), dtype or value.dtype)
    disk_dtype = next(iter(tensors.values())).dtype
    hf_config = config.to_hf() | {"dtype": str(jnp.dtype(disk_dtype))}
    shards = _split_into_shards(tensors, max_shard_bytes)
    for stale in folder.glob("model*.safetensors*"):
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale.name):
            stale.unlink()
    if len(shards) == 1:
        _save_tensors(shards[0], folder / SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save_tensors(shard, folder / filename)
            weight_map.update({name: filename for name in shard})
        total = sum(t.size * t.dtype.itemsize for t in tensors.values())
        index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    # What transformers' generate() reads for its stop and padding ids (it warns when the file is missing).
    generation = {key: hf_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if hf_config[key] is not None}
    (folder / GENERATION_CONFIG_FILE).write_text(json.dumps({"_from_model_config": True, **generation}, indent=2)
                                                 + "\n")


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def checkpoint_dtype(path: str | pathlib.Path) -> str:
    """The floating dtype most of a checkpoint folder's tensors are stored in (e.g. ``"bfloat16"``).

    Reads only the safetensors headers.
    """
    files = sorted(set(check_weights(path).values()))
    counts: dict[str, int] = {}
    for file in files:
        for entry in _safetensors_header(file).values():
            if entry["dtype"] in _SAFETENSORS_DTYPES:
                counts[_SAFETENSORS_DTYPES[entry["dtype"]]] = counts.get(_SAFETENSORS_DTYPES[entry["dtype"]], 0) + 1
    if not counts:
        raise ValueError(f"{path}: no floating-point tensors")
    return max(counts, key=counts.get)


def _save_tensors(tensors: dict[str, Array], file: pathlib.Path) -> None:
    if storage.is_remote(file):  # safetensors writes local files only: the bytes, uploaded whole
        file.write_bytes(save_bytes(tensors, metadata={"format": "pt"}))
        return
    save_file(tensors, file, metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600); a checkpoint is meant to be
    # shared and served, so give it the usual permissions of a written file.
    os.chmod(file, 0o644)


def _split_into_shards(tensors: dict[str, Array], max_shard_bytes: int | None) -> list[dict[str, Array]]:
    if max_shard_bytes is None:
        return [tensors]
    shards: list[dict[str, Array]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.size * tensor.dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards
