"""Reading a ``torch.export`` archive (``.pt2``) without unpickling anything.

``torch.export.load`` unpickles in several places: weights and constants whose entry in the archive's payload
config says ``use_pickle`` (``torch.load(weights_only=False)``), opaque-object and custom-object constants
(``pickle.loads``), legacy ``weights/<model>.pt`` files, and the example inputs (``torch.load``, retried with
``weights_only=False`` when the safe load fails). A real ``torch.export.save`` archive edited at any of
those places runs code on load. :func:`load_program` reads the archive itself: the program from its JSON,
weights and constants only as raw tensor bytes, and refuses any entry that would need pickle. Example inputs
are never read: they are rebuilt from the graph's input shapes and dtypes.

It relies on torch's own archive reader and deserializer (``torch.export.pt2_archive._package``), called only
after every payload entry has been checked to be raw; torch is pinned (2.13), and a test builds a real
archive, poisons it, and checks both the refusal and that the payload never ran.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from compression.errors import InvalidModel, UnsupportedModelFormat


def load_program(path: Path) -> tuple[Any, tuple[Any, ...]]:
    """The archive's ``ExportedProgram`` and example arguments (zeros of each input's shape and dtype).

    Raises:
        UnsupportedModelFormat: an entry needs pickle (``use_pickle``, opaque or custom objects, legacy
            weight files), or the archive is not ``torch.export.save``'s format.
        InvalidModel: the archive is malformed.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    from torch.export.pt2_archive import _package as pkg
    from torch.export.pt2_archive import constants as c

    try:
        reader = pkg.PT2ArchiveReader(str(path))
    except Exception as e:
        raise InvalidModel(f"not a readable .pt2 archive: {type(e).__name__}") from None
    with reader:
        names = reader.get_file_names()
        if c.ARCHIVE_FORMAT_PATH not in names or reader.read_string(c.ARCHIVE_FORMAT_PATH) != c.ARCHIVE_FORMAT_VALUE:
            raise UnsupportedModelFormat("not a torch.export.save archive (.pt2); save the program with "
                                         "torch.export.save")
        programs = [n for n in names if n.startswith(c.MODELS_DIR) and n.endswith(".json")]
        if len(programs) != 1:
            raise InvalidModel(f"the .pt2 must hold exactly one exported program, found {len(programs)}")
        model_name = programs[0][len(c.MODELS_DIR):-len(".json")]
        _refuse_pickles(reader, names, model_name, pkg, c)
        try:
            program = _bytes_to_dataclass(schema.ExportedProgram, reader.read_bytes(programs[0]))
            state_dict = pkg._load_state_dict(reader, model_name)   # raw tensors only: checked above
            constants = pkg._load_constants(reader, model_name)
            ep = ExportedProgramDeserializer(None).deserialize(program, state_dict, constants, None)
        except UnsupportedModelFormat:
            raise
        except Exception as e:
            raise InvalidModel(f"not a loadable torch.export program: {type(e).__name__}: {str(e)[:300]}") from None
    return ep, example_args(ep)


def _refuse_pickles(reader: Any, names: list[str], model_name: str, pkg: Any, c: Any) -> None:
    """Every weight and constant must be a raw tensor; anything that would be unpickled is refused."""
    for legacy in (f"{c.WEIGHTS_DIR}{model_name}.pt", f"{c.CONSTANTS_DIR}{model_name}.pt"):
        if legacy in names:
            raise UnsupportedModelFormat("this .pt2 stores its weights pickled (legacy format), which is never "
                                         "unpickled; re-save it with a current torch.export.save")
    for config_name, kind in ((c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model_name), "weight"),
                              (c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model_name), "constant")):
        if config_name not in names:
            raise InvalidModel(f"the .pt2 has no {kind} table ({Path(config_name).name})")
        try:
            config = pkg._load_payload_config(reader, config_name)
        except Exception as e:
            raise InvalidModel(f"the .pt2's {kind} table is malformed: {type(e).__name__}") from None
        for fqn, meta in config.config.items():
            if meta.use_pickle:
                raise UnsupportedModelFormat(f"{kind} {fqn!r} of this .pt2 is pickled, and pickles are never "
                                             "loaded; export tensors only (no custom objects)")
            if kind == "constant" and not meta.path_name.startswith(c.TENSOR_CONSTANT_FILENAME_PREFIX):
                raise UnsupportedModelFormat(f"constant {fqn!r} of this .pt2 is a Python object, which would be "
                                             "unpickled; only tensor constants are accepted")
            if meta.tensor_meta is None:
                raise InvalidModel(f"{kind} {fqn!r} of this .pt2 has no tensor description")


def example_args(ep: Any) -> tuple[Any, ...]:
    """Zeros shaped like the program's user inputs (symbolic sizes at their recorded hints, else 2)."""
    import torch

    user_inputs = set(ep.graph_signature.user_inputs)
    args = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise InvalidModel(f"input {node.name!r} of this .pt2 is not a tensor; only tensor inputs are supported")
        dims = []
        for d in val.shape:
            if isinstance(d, int):
                dims.append(d)
            else:
                hint = getattr(d.node, "hint", None)
                dims.append(int(hint) if hint is not None else 2)
        args.append(torch.zeros(dims, dtype=val.dtype))
    return tuple(args)
