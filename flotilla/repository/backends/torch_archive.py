"""Which kind of PyTorch model file a file is, decided from its zip listing before torch opens it.

- A TorchScript archive (``torch.jit.save``: ``<root>/code/`` and ``<root>/constants.pkl``): loaded with
  ``torch.jit.load``, whose unpickler only rebuilds TorchScript types.
- A ``torch.export`` program (``torch.export.save``: ``<root>/archive_format`` = ``pt2``): loaded with
  ``torch.export.load`` only after the checks below, because that loader falls back to full pickle for some
  payloads. Refused: weights or constants stored as pickles (``use_pickle``), custom/opaque object constants,
  the legacy single-file weights, AOTInductor/ExecuTorch/MTIA payloads (compiled code), and sample inputs that
  ``torch.load(weights_only=True)`` cannot read.
- Anything else is refused: a ``torch.save`` pickle of an ``nn.Module`` (``<root>/data.pkl`` only), a pre-zip
  pickle, or an unknown file. Unpickling can run arbitrary code, so none of these is opened.

The pt2 layout names come from ``torch.export.pt2_archive.constants``; ``tests/test_repository_backends.py``
exports and saves a program with this torch and checks it is accepted, so a layout change fails loudly.
"""

from __future__ import annotations

import io
import json
import zipfile

from flotilla.errors import ModelLoadError

TORCHSCRIPT = "torchscript"
EXPORTED_PROGRAM = "exported_program"

_HOW_TO_SAVE = ("save the model as TorchScript (torch.jit.script(module) or torch.jit.trace(module, example)"
                ", then .save('model.pt')) or as a torch.export program (torch.export.save(torch.export."
                "export(module, example_args, dynamic_shapes=...), 'model.pt2'))")


def pickle_refusal(path: str, what: str) -> ModelLoadError:
    return ModelLoadError(f"refusing to load {path}: it is {what}, and loading a pickle can execute arbitrary "
                          f"code; pickled nn.Modules and checkpoints are not a model format. Instead, "
                          f"{_HOW_TO_SAVE}")


def classify(path: str) -> str:
    """``TORCHSCRIPT`` or ``EXPORTED_PROGRAM`` for a model file; ModelLoadError for anything else (see the
    module doc), raised before any of the file is unpickled."""
    if not zipfile.is_zipfile(path):
        raise pickle_refusal(path, "not a zip archive (a legacy torch.save pickle, or not a PyTorch file)")
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise ModelLoadError(f"{path} is a zip file but not a PyTorch archive (one top-level folder); "
                                 f"{_HOW_TO_SAVE}")
        root = roots.pop() + "/"
        entries = {n[len(root):] for n in names}
        from torch.export.pt2_archive import constants as pt2
        if pt2.ARCHIVE_FORMAT_PATH in entries:
            _check_pt2(path, archive, root, entries, pt2)
            return EXPORTED_PROGRAM
        if "constants.pkl" in entries and any(e.startswith("code/") for e in entries):
            return TORCHSCRIPT
        if "data.pkl" in entries:
            raise pickle_refusal(path, "a torch.save pickle (of an nn.Module or a state dict), not a "
                                       "TorchScript or torch.export program")
        raise ModelLoadError(f"{path} is neither a TorchScript nor a torch.export archive; {_HOW_TO_SAVE}")


def _check_pt2(path: str, archive: zipfile.ZipFile, root: str, entries: set[str], pt2) -> None:
    fmt = archive.read(root + pt2.ARCHIVE_FORMAT_PATH).decode("utf-8", "replace").strip()
    if fmt != pt2.ARCHIVE_FORMAT_VALUE:
        raise ModelLoadError(f"{path}: archive_format is {fmt!r}, not {pt2.ARCHIVE_FORMAT_VALUE!r}")
    compiled = [d for d in (pt2.AOTINDUCTOR_DIR, pt2.EXECUTORCH_DIR, pt2.MTIA_DIR, pt2.XL_MODEL_WEIGHTS_DIR)
                if any(e.startswith(d) for e in entries)]
    if compiled:
        raise ModelLoadError(f"refusing to load {path}: it carries compiled payloads ({', '.join(compiled)}: "
                             f"AOTInductor/ExecuTorch code); save the plain program with torch.export.save")
    models = [e[len(pt2.MODELS_DIR):-len(".json")] for e in entries
              if e.startswith(pt2.MODELS_DIR) and e.endswith(".json")]
    if not models:
        raise ModelLoadError(f"{path}: a pt2 archive without an exported program ({pt2.MODELS_DIR}*.json)")
    for model in models:
        for legacy in (f"{pt2.WEIGHTS_DIR}{model}.pt", f"{pt2.CONSTANTS_DIR}{model}.pt"):
            if legacy in entries:
                raise pickle_refusal(path, f"a torch.export archive whose {legacy} is a pickle (legacy format)")
        _check_payload_config(path, archive, root, entries, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), None)
        _check_payload_config(path, archive, root, entries, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model),
                              pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
        _check_sample_inputs(path, archive, root, entries, pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model))


def _check_payload_config(path: str, archive: zipfile.ZipFile, root: str, entries: set[str], config_name: str,
                          required_prefix: str | None) -> None:
    if config_name not in entries:
        return
    try:
        config = json.loads(archive.read(root + config_name)).get("config", {})
    except (ValueError, AttributeError):
        raise ModelLoadError(f"{path}: {config_name} is not a valid payload config") from None
    for fqn, payload in config.items():
        if payload.get("use_pickle", False):
            raise pickle_refusal(path, f"a torch.export archive whose tensor {fqn!r} is stored as a pickle")
        if required_prefix and not str(payload.get("path_name", "")).startswith(required_prefix):
            raise pickle_refusal(path, f"a torch.export archive whose constant {fqn!r} is a pickled object")


def _check_sample_inputs(path: str, archive: zipfile.ZipFile, root: str, entries: set[str], name: str) -> None:
    if name not in entries:
        return
    data = archive.read(root + name)
    if not data:
        return
    import torch
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception:
        raise pickle_refusal(path, f"a torch.export archive whose {name} is not a plain tensor file") from None
