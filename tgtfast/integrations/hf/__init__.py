"""The pieces of :mod:`tgtfast.integrations.transformers` (imported from there; this package imports
transformers)."""
