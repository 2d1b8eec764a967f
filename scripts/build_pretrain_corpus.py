#!/usr/bin/env python3
"""Build the unlabelled pretraining corpus of the shipped demo weights from Debian packages.

    python scripts/build_pretrain_corpus.py OUT_DIR [--packages PKG[=VERSION] ...]

For each package: `apt-get download PKG[=VERSION]` into OUT_DIR/debs, `dpkg -x` into
OUT_DIR/extracted/PKG, then every wav/flac/ogg file soundfile can read is linked under
OUT_DIR/audio/PKG/... . OUT_DIR/manifest.csv lists path, package, seconds, sample rate and
channels; OUT_DIR/corpus.json holds the package versions, .deb sha256 sums and hours per package.
Needs only apt-get and dpkg (no root). Pin versions (`PKG=VERSION`) to rebuild the exact corpus;
the defaults are the Debian 12 (bookworm) versions the shipped weights were trained on.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf

# Debian 12 (bookworm) main. Recorded speech in five languages (8 kHz telephone prompts), spoken
# letters in ~20 languages, spoken words, game music and dialogue, instrument and drum samples,
# and full-band recorded music (orchestral and electronic game soundtracks, guitar rock songs,
# LMMS instrument samples) so that the upper half of the mel range is not mostly empty.
DEFAULT_PACKAGES = [
    "asterisk-core-sounds-en-wav=1.6.1-1",
    "asterisk-core-sounds-es-wav=1.6.1-1",
    "asterisk-core-sounds-fr-wav=1.6.1-1",
    "asterisk-core-sounds-it-wav=1.6.1-1",
    "asterisk-core-sounds-ru-wav=1.6.1-1",
    "klettres-data=4:22.12.3-1",
    "ktuberling-data=4:22.12.3-1",
    "fillets-ng-data=1.0.1-1.1",
    "sonic-pi-samples=3.2.2~repack-8",
    "wesnoth-1.16-music=1:1.16.9-1",
    "warzone2100-music=4.3.3-3",
    "fretsonfire-songs-muldjord=2.dfsg-2.1",
    "fretsonfire-songs-sectoid=1.dfsg-3.1",
    "frozen-bubble-data=2.212-11",
    "extremetuxracer-data=0.8.2-1",
    "lmms-common=1.2.2+dfsg1-6",
]
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus")  # .opus: Ogg Opus, read by libsndfile >= 1.0.29


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_package(spec: str, debs: Path, extracted: Path) -> tuple[str, str, Path, Path]:
    """apt-get download + dpkg -x; returns (name, version, .deb path, extraction dir)."""
    name = spec.split("=", 1)[0]
    target = extracted / name
    existing = sorted(debs.glob(f"{name}_*.deb"))
    if not existing:
        subprocess.run(["apt-get", "download", spec], cwd=debs, check=True)
        existing = sorted(debs.glob(f"{name}_*.deb"))
    deb = existing[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    if "=" in spec and spec.split("=", 1)[1] != version:
        raise SystemExit(f"{deb}: version {version} but {spec} was asked for; delete it and rerun")
    if not target.is_dir():
        subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
    return name, version, deb, target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--packages", nargs="+", default=DEFAULT_PACKAGES, help="PKG or PKG=VERSION")
    args = parser.parse_args(argv)

    out = Path(args.out_dir).resolve()
    debs, extracted, audio_root = out / "debs", out / "extracted", out / "audio"
    for folder in (debs, extracted, audio_root):
        folder.mkdir(parents=True, exist_ok=True)

    rows, packages = [], {}
    for spec in args.packages:
        name, version, deb, target = fetch_package(spec, debs, extracted)
        seconds, count, unreadable = 0.0, 0, 0
        for path in sorted(target.rglob("*")):
            if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file():
                continue
            try:
                info = sf.info(str(path))
            except (RuntimeError, sf.LibsndfileError):
                unreadable += 1
                continue
            link = audio_root / name / path.relative_to(target)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(path, link)
            rows.append([str(link.relative_to(out)), name, f"{info.duration:.3f}", info.samplerate, info.channels])
            seconds += info.duration
            count += 1
        packages[name] = {"version": version, "deb": deb.name, "sha256": sha256(deb), "files": count,
                          "unreadable": unreadable, "hours": round(seconds / 3600, 3)}
        print(f"{name:<32} {version:<18} {count:>6} files {seconds / 3600:7.3f} h"
              + (f"  ({unreadable} unreadable skipped)" if unreadable else ""), file=sys.stderr)

    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "package", "seconds", "sample_rate", "channels"])
        writer.writerows(rows)
    total = sum(p["hours"] for p in packages.values())
    (out / "corpus.json").write_text(json.dumps({"packages": packages, "files": len(rows),
                                                 "hours": round(total, 3)}, indent=2) + "\n")
    print(f"total: {len(rows)} files, {total:.2f} h of audio in {audio_root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
