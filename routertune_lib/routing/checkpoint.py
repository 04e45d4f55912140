"""Router checkpoints: ``save_routers`` / ``load_routers`` (one safetensors file), and ``restore_routers``, which
``models.load_model`` calls to re-attach the routers of a model saved with ``save_pretrained``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..models import model_identity, register_config_restorer
from ..reporting import write_atomic
from .config import CHECKPOINT_FORMAT, RouterConfig
from .model import (attach_routers, detach_routers, load_router_state, routed_layers, router_record, router_state,
                    set_thresholds)


def save_routers(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the routers to one safetensors file (weights, ``RouterConfig``, thresholds, base-model identity).

    The file is written atomically (temporary file, then rename); ``path`` must not be a directory.
    """
    if Path(path).is_dir():
        raise ValueError(f"save_routers writes one file, but {path} is a directory; pass a file path such as "
                         f"{Path(path) / 'routers.safetensors'}")
    tensors = router_state(model)
    record = {**router_record(model), "base_model": model_identity(model)}
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}
    return write_atomic(path, safetensors_bytes(tensors if tensors else {"empty": torch.zeros(0)}, metadata=metadata))


def load_routers(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach the routers saved by ``save_routers`` to ``model`` (a stock model, or one with the same routers)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # not a safetensors file at all
        raise ValueError(f"{path} is not a router checkpoint (expected a safetensors file from save_routers): {e}")
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a router checkpoint (format {metadata.get('format')!r}, expected "
                         f"{CHECKPOINT_FORMAT!r}); create one with routertune_lib.save_routers")
    saved = json.loads(metadata["base_model"])
    here = model_identity(model)
    mismatch = {k: (saved[k], here[k]) for k in ("model_type", "hidden_size", "num_hidden_layers") if saved[k] != here[k]}
    if mismatch:
        raise ValueError(
            f"Router checkpoint {path} was trained for another model: "
            + ", ".join(f"{k} saved={a} here={b}" for k, (a, b) in mismatch.items())
        )
    config = RouterConfig.from_dict(json.loads(metadata["config"]))
    static = json.loads(metadata["static_drop"])
    setup = getattr(model, "routertune", None)
    if setup is None:
        attach_routers(model, config, static_drop=static)
    elif asdict(setup.config) != asdict(config) or setup.static != static:
        raise ValueError(f"The model's routers ({setup.config}) differ from the checkpoint's ({config}); "
                         "detach_routers(model) first")
    load_router_state(model, load_file(str(path)))
    set_thresholds(model, {int(i): t for i, t in json.loads(metadata["thresholds"]).items()})
    return model


def restore_routers(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Re-attach the routers of a routed model saved with ``save_pretrained`` to ``directory``: settings from
    ``model.config.routertune`` (config.json), weights from the directory's ``*.safetensors`` files. Returns
    ``model``; a model whose config has no ``routertune`` entry is returned unchanged. ``models.load_model`` calls it.
    """
    from safetensors import safe_open

    record = getattr(model.config, "routertune", None)
    if record is None:
        return model
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}/config.json has a 'routertune' entry that is not a {CHECKPOINT_FORMAT!r} "
                         f"router record: {record!r:.200}")
    del model.config.routertune  # attach_routers writes it again
    attach_routers(model, RouterConfig.from_dict(record["config"]), static_drop=record["static_drop"])
    names = {module: name for name, module in model.named_modules()}
    wanted = {f"{names[layer.router]}.{name}": p for layer in routed_layers(model).values()
              if layer.router is not None for name, p in layer.router.named_parameters()}
    found = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in wanted.keys() & set(f.keys())})
    missing = sorted(wanted.keys() - found.keys())
    if missing:
        detach_routers(model)
        raise ValueError(f"{directory}/config.json describes routers, but its safetensors files lack {missing}; "
                         "save the routed model again with save_pretrained")
    with torch.no_grad():
        for k, param in wanted.items():
            param.copy_(found[k])
    set_thresholds(model, record["thresholds"])
    return model


register_config_restorer("routertune", restore_routers)
