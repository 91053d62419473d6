"""`compensa codegen`: a participant contract's Python code, with no protoc
command line to write (see protos/compensa/v1/contract.proto)."""

from __future__ import annotations

import argparse
from pathlib import Path

from compensa.common.contracts import ContractError, proto_include_path
from compensa.orchestrator.cli.exit_codes import EXIT_OK
from compensa.orchestrator.definitions import compile_proto_files, proto_file_names, run_protoc
from compensa.orchestrator.shared.errors import CompensaError
from compensa.participants.codegen import generate_files


def codegen(args: argparse.Namespace) -> int:
    """Writes each file's FILE_pb2.py and FILE_pb2.pyi (protoc's) and, for a
    file that declares contracts, FILE_compensa.py (typed participant base
    classes and saga starters) under --out. With --include-path, prints
    protoc's include directory for compensa/v1/contract.proto instead."""
    if args.include_path:
        if args.files or args.out is not None:
            raise CompensaError("codegen --include-path takes no FILE.proto and no --out: it only prints a directory")
        print(proto_include_path())
        return EXIT_OK
    if not args.files or args.out is None:
        raise CompensaError("codegen needs FILE.proto (one or more) and --out DIR (or --include-path alone)")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    run_protoc(args.files, args.proto_path, [f"--python_out={out}", f"--pyi_out={out}"])
    types = compile_proto_files(args.files, args.proto_path)
    try:
        generated = generate_files(types.file, proto_file_names(args.files, args.proto_path))
    except ContractError as error:
        raise CompensaError(f"not a participant contract: {error}") from None
    for name, content in generated.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {path}")
    if not generated:
        print("no participant contract in these files (no rpc with the (compensa.v1.step) option):"
              " wrote their _pb2 modules only")
    return EXIT_OK
