"""The classical anchor: bits per byte of general-purpose compressors on held-out text, given the training
text, as a language model is scored on it.

    python benchmarks/compressors.py --train runs/kjv/corpus/train --held runs/kjv/corpus/heldout

A compressor given the training text pays for the held-out text `size(compress(train + held)) −
size(compress(train))` bytes; times 8 over the held-out bytes is its bits per byte. Both texts are read as
the models read them (the corpus reader's documents: a paragraph's hard wraps joined, one document a
line), so a model's bits per byte and a compressor's count the same bytes. xz and bz2 at their strongest
settings from the standard library; zstd at level 22 with a 128 MiB window, from the `zstd` program (Debian
package zstd), left out when it is not installed. bz2 compresses 900 kB blocks independently, so it sees
only the end of the training text; xz's and zstd's windows hold all of it.
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from stablekd.data_pipeline.sources import Corpus, iter_documents, resolve_paths


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def _bz2(data: bytes) -> bytes:
    return bz2.compress(data, 9)


def _zstd(data: bytes) -> bytes:
    cmd = ["zstd", "--ultra", "-22", "--long=27", "-c", "-q"]
    return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout


def compressors() -> dict[str, Callable[[bytes], bytes]]:
    """name -> compress function, of those this machine has."""
    out = {"xz": _xz, "bz2": _bz2}
    if shutil.which("zstd"):
        out["zstd"] = _zstd
    return out


def read_text(paths: list[Path]) -> bytes:
    """The documents of `paths` as the corpus reader yields them, one per line, UTF-8."""
    docs = iter_documents(Corpus(tuple(resolve_paths(paths)), text_unit="paragraph"))
    return "".join(d + "\n" for d in docs).encode()


def conditional_bits_per_byte(train: bytes, held: bytes) -> dict[str, float]:
    """Each compressor's bits per held-out byte given `train`: 8 · (|C(train + held)| − |C(train)|) / |held|."""
    out = {}
    for name, compress in compressors().items():
        out[name] = 8 * (len(compress(train + held)) - len(compress(train))) / len(held)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, nargs="+", required=True, help="training text: files or directories")
    p.add_argument("--held", type=Path, nargs="+", required=True, help="held-out text: files or directories")
    a = p.parse_args()
    train, held = read_text(a.train), read_text(a.held)
    print(f"train {len(train):,} bytes, held out {len(held):,} bytes")
    for name, bpb in conditional_bits_per_byte(train, held).items():
        print(f"{name:5s} {bpb:.3f} bits per byte")


if __name__ == "__main__":
    main()
