"""Alembic environment shipped inside the package; applied by ``storage.session``."""
