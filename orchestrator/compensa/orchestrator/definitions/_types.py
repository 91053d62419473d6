"""The schema a definition carries: its message types as a FileDescriptorSet,
compiled from .proto files or read from a descriptor set the user has."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2, message

from compensa.common.contracts import proto_include_path
from compensa.orchestrator.shared.errors import DefinitionError


def compile_proto_files(files: Sequence[Path], include_paths: Sequence[Path] = ()) -> descriptor_pb2.FileDescriptorSet:
    """Compiles .proto files with their imports into one descriptor set (the
    protobuf compiler of grpcio-tools, in this process). Imports are looked
    for in `include_paths`, then each file's own directory, then the
    well-known types and compensa's own protos (compensa/v1/contract.proto,
    installed with compensa: `proto_include_path()`).
    DefinitionError with the compiler's message if it fails."""
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "types.binpb"
        run_protoc(files, include_paths, ["--include_imports", f"--descriptor_set_out={output}"])
        return read_descriptor_set(output)


def run_protoc(files: Sequence[Path], include_paths: Sequence[Path], outputs: Sequence[str]) -> None:
    """Runs the protobuf compiler of grpcio-tools in this process on `files`
    with the `outputs` options (--python_out=DIR, ...); see compile_proto_files
    for where imports are found. DefinitionError with the compiler's message if it fails."""
    from grpc_tools import protoc

    for file in files:
        if not file.is_file():
            raise DefinitionError(f"no such .proto file: {file}")
    well_known = resources.files("grpc_tools") / "_proto"
    roots = _roots(files, include_paths)
    with tempfile.TemporaryDirectory() as scratch:
        errors = Path(scratch) / "errors.txt"
        arguments = [
            "protoc", *(f"--proto_path={root}" for root in roots), f"--proto_path={well_known}",
            f"--proto_path={proto_include_path()}", *outputs,
            *proto_file_names(files, include_paths),
        ]
        with _stderr_to(errors):
            status = protoc.main(arguments)
        if status != 0:
            detail = " ".join(errors.read_text(errors="replace").split()) if errors.exists() else ""
            hint = ""
            if "was not found" in detail or "File not found" in detail:
                hint = (f" (imports are looked for in {', '.join(str(root) for root in roots)} and the well-known"
                        " types; add the directory your imports are relative to with --proto-path DIR)")
            raise DefinitionError(
                f"the .proto files do not compile: {detail or f'protoc exit status {status}'}{hint}"
            )


def read_descriptor_set(path: Path) -> descriptor_pb2.FileDescriptorSet:
    """A FileDescriptorSet file (`protoc --include_imports --descriptor_set_out`, `buf build -o`)."""
    try:
        types = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    except OSError as error:
        raise DefinitionError(f"cannot read the descriptor set: {error.strerror}", source=str(path)) from None
    except message.DecodeError:
        raise DefinitionError("not a FileDescriptorSet (protoc --descriptor_set_out)", source=str(path)) from None
    if not types.file:
        raise DefinitionError("the descriptor set holds no file", source=str(path))
    return types


def proto_file_names(files: Sequence[Path], include_paths: Sequence[Path] = ()) -> list[str]:
    """The names protoc gives `files` (travel/v1/trip.proto): each relative
    to the first of `include_paths`, then of its own directory, that holds it."""
    roots = _roots(files, include_paths)
    return [file.resolve().relative_to(_root_of(file, roots)).as_posix() for file in files]


def _roots(files: Sequence[Path], include_paths: Sequence[Path]) -> list[Path]:
    # A file is named after the first root that holds it (as protoc wants),
    # so the --proto-path directories come before the files' own.
    return list(dict.fromkeys([*(p.resolve() for p in include_paths), *(file.resolve().parent for file in files)]))


def _root_of(file: Path, roots: Sequence[Path]) -> Path:
    resolved = file.resolve()
    return next(root for root in roots if resolved.is_relative_to(root))


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Sends file descriptor 2 to `path` for a while: protoc writes its
    errors there, from C++, not through sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
