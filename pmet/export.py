"""An edited model as a GGUF file (llama.cpp, ollama): the base model's GGUF with every tensor and every metadata
entry copied as it is (same quantisation, tokenizer included), the edited matrices written in full precision
(F32: the exact weights pmet edited; F16: half the size, rounded; or re-quantised to the base tensor's own type,
which can erase a small Δ: docs/PATCHES.md measures it), and the model card as `pmet.*` metadata.

Only the edited matrices change. They are FFN output (`ffn_down`) and, with update-attn, attention output
(`attn_output`) projections, which transformers' and llama.cpp's GGUF conventions store in the same layout as the
Hugging Face weight (no permutation), so W0 + Δ is written as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

TENSOR_TYPES = ("f32", "f16", "source")


def gguf_tensor_names(reader, weights: list[str]) -> dict[str, str]:
    """GGUF tensor name of each Hugging Face weight name (gguf's own name map for the file's architecture)."""
    import gguf

    arch = reader.get_field("general.architecture").contents()
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise ConfigError(f"GGUF architecture '{arch}' is unknown to the gguf package")
    n_blocks = int(reader.get_field(f"{arch}.block_count").contents())
    tmap = gguf.get_tensor_name_map(by_name[arch], n_blocks)
    present = {t.name for t in reader.tensors}
    names = {w: tmap.get_name(w, try_suffixes=(".weight",)) for w in weights}
    missing = [w for w, g in names.items() if g not in present]
    if missing:
        raise ConfigError(f"weight '{missing[0]}' has no tensor in the GGUF file (architecture '{arch}')")
    return names


def write_gguf(source: Path, out: str, edited: dict[str, torch.Tensor], tensor_type: str, card: dict[str, str],
               name_suffix: str = " (edited by pmet)") -> None:
    """Copy `source` to `out` with the tensors in `edited` (Hugging Face weight name -> edited weight) replaced,
    in `tensor_type`, and the card's key/values added (gguf's own copy recipe, scripts/gguf_new_metadata.py)."""
    import gguf

    if tensor_type not in TENSOR_TYPES:
        raise ConfigError(f"--tensor-type must be one of {', '.join(TENSOR_TYPES)}")
    reader = gguf.GGUFReader(str(source))
    names = gguf_tensor_names(reader, list(edited))
    shapes = {t.name: [int(x) for x in reversed(t.shape)] for t in reader.tensors}
    for w, g in names.items():
        if list(edited[w].shape) != shapes[g]:
            raise ConfigError(f"GGUF tensor '{g}' has shape {shapes[g]}, the edited weight {list(edited[w].shape)}: "
                              "this architecture stores it in another layout")
    types = {t.name: t.tensor_type for t in reader.tensors}
    arrays = {names[w]: _encode(t.detach().float().cpu().numpy(), tensor_type, types[names[w]])
              for w, t in edited.items()}
    writer = gguf.GGUFWriter(out, arch=reader.get_field("general.architecture").contents())
    _copy_metadata(reader, writer, card, name_suffix)
    for t in reader.tensors:
        if t.name in arrays:
            a, qtype = arrays[t.name]
            writer.add_tensor_info(t.name, a.shape, a.dtype, a.nbytes, qtype)
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(arrays[t.name][0] if t.name in arrays else t.data, tensor_endianess=reader.endianess)
    writer.close()


def _copy_metadata(reader, writer, card: dict[str, str], name_suffix: str) -> None:
    """Every key/value of the source (the name marked as edited), then the card's."""
    import gguf

    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name in card:
            continue
        value = field.contents()
        if field.name == "general.name":
            value = f"{value}{name_suffix}"
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for key, value in card.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.STRING)


def _encode(a: np.ndarray, tensor_type: str, source_type):
    """(data, GGML type) of an edited weight in `tensor_type` ("source": the base tensor's own type)."""
    import gguf

    if tensor_type == "f32":
        return a.astype(np.float32), gguf.GGMLQuantizationType.F32
    if tensor_type == "f16":
        return a.astype(np.float16), gguf.GGMLQuantizationType.F16
    try:
        return gguf.quants.quantize(a.astype(np.float32), source_type), source_type
    except (NotImplementedError, gguf.quants.QuantError) as e:
        raise ConfigError(f"--tensor-type source: the gguf package cannot quantise to {source_type.name} ({e})"
                          ) from None
