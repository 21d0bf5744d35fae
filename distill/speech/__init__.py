"""A small real Voxtral-style model from real parts: SmolLM2-135M as the decoder, a Whisper-style encoder trained here
from scratch on speech synthesised with espeak-ng and flite, the adapter trained as Voxtral does. `python -m
distill.speech` runs it end to end (`make speech-demo`); docs/speech-demo.md holds what it measured."""
