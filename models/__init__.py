"""Registry of named models, their preparation (download, conversion) and tokenizers."""
