"""Offline demo corpora: procedurally drawn captioned images (shapes) and synthesized speech."""
