"""Train mtcot_jax: `python train.py [--config configs/demo.yaml] [section.key=value ...]`."""

from mtcot_jax.cli.train import main

if __name__ == "__main__":
  main()
