"""Sharing a run the way the ecosystem does: model cards (card.py, huggingface_hub's ModelCard) in merged/,
adapter/ and every export, and uploads to the Hugging Face Hub (hub.py: `frod push`, `train.push_to_hub`)."""
