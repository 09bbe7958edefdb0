"""The Noto emoji set (npm ``emoji-datasource-google``) as a captioned image set: 64x64 RGBA PNGs, captions from
each emoji's name, short names, category and subcategory, and a held-out set of names never seen in training.

    make_emoji_dataset(out)   # fetches the package with `npm pack` into the cache when no source is given

writes ``out/train/`` and ``out/held_out/`` (raw shards for create_phase, :mod:`.captioned_images`) and
``out/emoji_dataset.json`` (what was written, the held-out names). Data: MIT (emoji-datasource); images: Apache-2.0
(Noto Emoji).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np

from .captioned_images import CaptionedImage, write_shards

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
IMAGE_DIR = "img/google/64"
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark",
              "1F3FF": "dark"}


class EmojiSourceError(RuntimeError):
    """The emoji package could not be had; the message says what to install or pass."""


def default_cache() -> Path:
    """Where the fetched package is kept: ``$MMDIT_CACHE`` or ``~/.cache/mmdit``."""
    return Path(os.environ.get("MMDIT_CACHE", Path.home() / ".cache" / "mmdit"))


def fetch_package(cache: str | Path | None = None) -> Path:
    """The unpacked package folder (``emoji.json`` + ``img/google/64``), fetched once with ``npm pack``."""
    root = Path(cache or default_cache()) / f"{PACKAGE}-{VERSION}"
    package = root / "package"
    if (package / "emoji.json").is_file() and (package / IMAGE_DIR).is_dir():
        return package
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiSourceError(
            f"npm was not found: install Node.js and npm (Debian/Ubuntu: `apt-get install npm`; or "
            f"https://nodejs.org), or fetch {PACKAGE}@{VERSION} elsewhere (`npm pack {PACKAGE}@{VERSION}`), unpack it "
            "and pass its package/ folder as the source (--source)")
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(root)],
                          capture_output=True, text=True, timeout=600)
    tgz = root / f"{PACKAGE}-{VERSION}.tgz"
    if done.returncode != 0 or not tgz.is_file():
        raise EmojiSourceError(f"`npm pack {PACKAGE}@{VERSION}` failed (is the npm registry reachable?): "
                               f"{(done.stderr or done.stdout).strip()[-500:]}")
    tmp = root / "package.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tgz) as tar:
        members = [m for m in tar.getmembers()
                   if m.name in ("package/emoji.json", "package/LICENSE") or m.name.startswith(f"package/{IMAGE_DIR}/")]
        tar.extractall(tmp, members=members, filter="data")
    shutil.rmtree(package, ignore_errors=True)
    os.replace(tmp / "package", package)
    shutil.rmtree(tmp, ignore_errors=True)
    tgz.unlink()
    return package


def words(text: str) -> str:
    """'HASH KEY' -> 'hash key', 'person-activity' -> 'person activity', 'flag-us' -> 'flag us'."""
    return " ".join(text.replace("-", " ").replace("_", " ").lower().split())


def emoji_name(entry: dict) -> str:
    """The readable name: the Unicode name, else the first short name (some entries have no name)."""
    return words(entry.get("name") or entry["short_names"][0])


def tone_words(code: str) -> str:
    """'1F3FB' -> 'light skin tone'; '1F3FB-1F3FF' -> 'light and dark skin tones'."""
    tones = [SKIN_TONES[c] for c in code.split("-") if c in SKIN_TONES]
    if len(set(tones)) == 1:
        return f"{tones[0]} skin tone"
    return " and ".join(tones) + " skin tones"


def captions(entry: dict, tone: str = "") -> tuple[str, str]:
    """(long, short): 'an emoji of runner, also running; person activity, people & body' and
    'an emoji of runner' (with ', <tone> skin tone' after the name for a skin-tone variant)."""
    name = emoji_name(entry) + (f", {tone}" if tone else "")
    others = [words(s) for s in entry.get("short_names", []) if words(s) != emoji_name(entry)]
    also = f", also {' or '.join(others[:2])}" if others else ""
    where = f"; {words(entry['subcategory'])}, {words(entry['category'])}"
    return f"an emoji of {name}{also}{where}", f"an emoji of {name}"


def load_entries(source: Path) -> list[dict]:
    """The package's emoji with a Google image, in its sort order."""
    entries = json.loads((source / "emoji.json").read_text())
    return sorted((e for e in entries if e.get("has_img_google")), key=lambda e: e["sort_order"])


def images_of(entry: dict, source: Path, skin_tones: bool) -> list[CaptionedImage]:
    """The base image of an emoji (and its skin-tone variants), captioned, with metadata columns."""
    meta = {"name": emoji_name(entry), "short_names": ",".join(entry.get("short_names", [])),
            "category": entry["category"], "subcategory": entry["subcategory"]}
    items = []
    variants = [("", entry)] + (sorted(entry.get("skin_variations", {}).items()) if skin_tones else [])
    for code, variant in variants:
        path = source / IMAGE_DIR / variant["image"]
        if not variant.get("has_img_google", True) or not path.is_file():
            continue
        tone = tone_words(code) if code else ""
        long, short = captions(entry, tone)
        items.append(CaptionedImage(path, long, short, {**meta, "unified": variant["unified"], "skin_tone": tone}))
    return items


def choose_held_out(entries: list[dict], count: int, seed: int) -> set[str]:
    """``count`` emoji names (never 'Component' ones: bare skin-tone swatches), drawn with ``seed``."""
    names = sorted({emoji_name(e) for e in entries if e["category"] != "Component"})
    if count > len(names) // 2:
        raise ValueError(f"held_out={count}: at most half of the {len(names)} emoji names may be held out")
    return set(np.random.default_rng(seed).choice(names, size=count, replace=False).tolist()) if count else set()


def make_emoji_dataset(out_dir: str | Path, source: str | Path | None = None, held_out: int = 48, seed: int = 0,
                       skin_tones: bool = True, rows_per_shard: int = 512, limit: int = 0) -> dict:
    """Raw shards of the emoji set: ``out/train`` and ``out/held_out`` (``held_out`` names whose captions never
    occur in train), ``out/emoji_dataset.json``. ``limit`` > 0 keeps the first emoji only (tests)."""
    src = Path(source) if source else fetch_package()
    if not (src / "emoji.json").is_file():
        raise EmojiSourceError(f"{str(src)!r} has no emoji.json: pass the unpacked {PACKAGE} package/ folder")
    entries = load_entries(src)[: limit or None]
    held = choose_held_out(entries, held_out, seed)
    split: dict[str, list[CaptionedImage]] = {"train": [], "held_out": []}
    for entry in entries:
        split["held_out" if emoji_name(entry) in held else "train"].extend(images_of(entry, src, skin_tones))
    seen = {c for item in split["train"] for c in (item.caption_long, item.caption_short)}
    leaked = [item.caption_short for item in split["held_out"] if {item.caption_long, item.caption_short} & seen]
    if leaked:
        raise AssertionError(f"held-out captions also in training: {leaked[:5]}")
    out = Path(out_dir)
    first = 0
    for part, items in split.items():
        shutil.rmtree(out / part, ignore_errors=True)
        if items:
            write_shards(items, out / part, rows_per_shard, first_id=first)
            first += len(items)
    info = {"source": f"{PACKAGE}@{VERSION}", "images": {k: len(v) for k, v in split.items()},
            "emoji": len(entries), "held_out": sorted(held), "seed": seed, "skin_tones": skin_tones, "limit": limit,
            "licence": "emoji-datasource: MIT; Noto Emoji images: Apache-2.0"}
    (out / "emoji_dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
