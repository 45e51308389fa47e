"""Carry a file bigger than one transfer to the GPU machine, in parts, and check it there.

The device tool sends at most 64 MiB a call, and the machine keeps its disk only while it stays warm
(a replaced machine starts bare). So: split the file here, carry one part per call, and on the machine
collect the parts outside the repository copy (which every call refreshes); each call reports which
parts are still missing -- all of them again when the machine was replaced -- and the call that
completes the set joins the parts and checks the whole file's SHA-256.

    python benchmarks/stage.py split FILE --parts 2 --out .stage          # here; .stage is git-ignored
    # each device call: carry .stage/NAME.manifest.json and one .stage/NAME.partK, then
    python benchmarks/stage.py receive .stage --dest /root/stage          # exit 0: dest/NAME is whole
                                                                          # exit 3: parts still missing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

MISSING = 3


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split(file: Path, parts: int, out: Path) -> None:
    """``out/NAME.partK`` (K = 0..parts-1) and ``out/NAME.manifest.json`` with every part's checksum."""
    out.mkdir(parents=True, exist_ok=True)
    size = file.stat().st_size
    step = -(-size // parts)
    manifest = {"name": file.name, "size": size, "sha256": sha256(file), "parts": []}
    with open(file, "rb") as f:
        for k in range(parts):
            part = out / f"{file.name}.part{k}"
            part.write_bytes(f.read(step))
            manifest["parts"].append({"file": part.name, "sha256": sha256(part)})
    (out / f"{file.name}.manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"{parts} parts of {file.name} ({size:,} B) in {out}")


def receive(carried: Path, dest: Path) -> int:
    """Moves the checked parts ``carried`` holds into ``dest``; joins them when all are there."""
    dest.mkdir(parents=True, exist_ok=True)
    status = 0
    for manifest_file in sorted(carried.glob("*.manifest.json")):
        manifest = json.loads(manifest_file.read_text())
        whole = dest / manifest["name"]
        if whole.is_file() and sha256(whole) == manifest["sha256"]:
            print(f"{manifest['name']}: complete at {whole}")
            continue
        for part in manifest["parts"]:
            src = carried / part["file"]
            if src.is_file():
                if sha256(src) != part["sha256"]:
                    raise SystemExit(f"{src} does not match its checksum: split the file again")
                shutil.copyfile(src, dest / part["file"])
        missing = [p["file"] for p in manifest["parts"]
                   if not (dest / p["file"]).is_file() or sha256(dest / p["file"]) != p["sha256"]]
        if missing:
            print(f"{manifest['name']}: still missing {', '.join(missing)} (carry them in the next calls)")
            status = MISSING
            continue
        tmp = whole.with_name(whole.name + ".tmp")
        with open(tmp, "wb") as f:
            for part in manifest["parts"]:
                with open(dest / part["file"], "rb") as src_f:
                    shutil.copyfileobj(src_f, f)
        if sha256(tmp) != manifest["sha256"]:
            tmp.unlink()
            raise SystemExit(f"{manifest['name']}: the joined parts do not match the file's checksum")
        tmp.replace(whole)
        print(f"{manifest['name']}: complete at {whole}")
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("file", type=Path)
    s.add_argument("--parts", type=int, required=True)
    s.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("receive")
    r.add_argument("carried", type=Path)
    r.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "split":
        split(args.file, args.parts, args.out)
    else:
        sys.exit(receive(args.carried, args.dest))


if __name__ == "__main__":
    main()
