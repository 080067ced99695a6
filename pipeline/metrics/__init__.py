"""Quality metrics on model outputs: speech distortion, pitch and speaker distances, the TTS score."""
