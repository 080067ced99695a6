"""Tokenizers: text (BPE, phonemes), image VQ, audio codecs."""
