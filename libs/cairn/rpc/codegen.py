"""Generates Python modules from proto/*.proto into cairn/rpc/gen (run by ./run.sh setup).

protoc writes `import x_pb2` for sibling imports; we rewrite those to package-relative
imports so the generated code lives inside the cairn package. Skips work when the
generated files are newer than their sources.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = ROOT / "proto"
GEN_DIR = Path(__file__).resolve().parent / "gen"
_SIBLING_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def _stale(protos: list[Path]) -> bool:
    for proto in protos:
        out = GEN_DIR / f"{proto.stem}_pb2.py"
        if not out.exists() or out.stat().st_mtime < proto.stat().st_mtime:
            return True
    return False


def generate(force: bool = False) -> list[Path]:
    from grpc_tools import protoc  # imported late: only setup needs grpcio-tools

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos or not (force or _stale(protos)):
        return []
    GEN_DIR.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={GEN_DIR}",
            f"--grpc_python_out={GEN_DIR}", f"--pyi_out={GEN_DIR}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("cairn: protoc failed on proto/*.proto (see the messages above)")
    written = sorted(GEN_DIR.glob("*_pb2*.py"))
    for path in written:
        text = path.read_text()
        path.write_text(_SIBLING_IMPORT.sub(r"from . import \1 as \2", text))
    (GEN_DIR / "__init__.py").write_text('"""Generated from proto/ by cairn.rpc.codegen."""\n')
    return written


def main() -> None:
    written = generate(force="--force" in sys.argv)
    if written:
        print(f"[cairn-setup] generated {len(written)} modules from proto/", file=sys.stderr)


if __name__ == "__main__":
    main()
