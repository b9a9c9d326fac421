"""``python -m cli``."""

from .app import app

if __name__ == "__main__":
    app(prog_name="skillbank")
