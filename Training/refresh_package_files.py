"""Rewrite sha256 and size of every file of a model package, in its configs/metadata.json and in models.json.

Why: after new weights are exported (train_*.py --export), both records must name the new file exactly, or the
engine refuses it on load (and Testing/Python/test_bundles.py checks that the two agree). Editing by hand is error
prone; this reads the files and replaces the old numbers with the new ones in both files' text (their layout kept).

    python Training/refresh_package_files.py Resources/Models/thick-slice-sr
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

REGISTRY = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "models.json"


def _replace_record(text: str, old_sha256: str, old_size: int, sha256: str, size: int) -> tuple[str, int]:
    """The file record ("sha256": old, "size": old) rewritten in JSON text; (text, how many were replaced)."""
    pattern = re.compile(r'("sha256":\s*")' + old_sha256 + r'("\s*,\s*"size":\s*)' + str(old_size) + r"\b")
    return pattern.subn(lambda match: match.group(1) + sha256 + match.group(2) + str(size), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="the model package folder (its name is the model id)")
    args = parser.parse_args(argv)
    metadata_path = args.package / "configs" / "metadata.json"
    metadata_text, registry_text = metadata_path.read_text(encoding="utf-8"), REGISTRY.read_text(encoding="utf-8")
    for entry in json.loads(metadata_text)["slicer"]["files"]:
        data = (args.package / entry["path"]).read_bytes()
        sha256, size = hashlib.sha256(data).hexdigest(), len(data)
        metadata_text, in_metadata = _replace_record(metadata_text, entry["sha256"], entry["size"], sha256, size)
        registry_text, in_registry = _replace_record(registry_text, entry["sha256"], entry["size"], sha256, size)
        if in_metadata != 1 or in_registry != 1:
            raise SystemExit(f"{entry['path']}: its old record was found {in_metadata} time(s) in {metadata_path} and "
                             f"{in_registry} time(s) in {REGISTRY} (expected once each); nothing written.")
        print(f"{sha256}  {size:>10}  {entry['path']}")
    metadata_path.write_text(metadata_text, encoding="utf-8")
    REGISTRY.write_text(registry_text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
