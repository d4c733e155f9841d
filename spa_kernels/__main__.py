"""``python -m spa_kernels``: print the configuration a bug report needs."""

from ._config import show_config

if __name__ == "__main__":
    show_config()
