"""Decode with mtcot_jax: `python decode.py --checkpoint WORKDIR --prompt "..." [--k 5]`."""

from mtcot_jax.cli.decode import main

if __name__ == "__main__":
  main()
