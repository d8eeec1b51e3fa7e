"""Generates the Python modules for ``serve/v1/distllm.proto`` with ``grpc_tools.protoc``.

The generated files are checked in (``serve/v1/distllm_pb2*.py``) so installing needs no protoc;
``tests/test_serve_proto.py`` regenerates them and fails when they are out of date. Run
``python -m serve.protos`` after editing the .proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "serve/v1/distllm.proto"


def generate(out_dir: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    stem = out_dir / PROTO[: -len(".proto")]
    return [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")]


if __name__ == "__main__":
    for p in generate():
        print(p)
    sys.exit(0)
